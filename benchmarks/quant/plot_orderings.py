r"""Plot: perplexity against bits per weight for RTN, GPTQ, AWQ and AWQ+GPTQ, one panel per model.

    python -m benchmarks.quant.plot_orderings \
        --panel="tiny=/tmp/quant/tiny" \
        --panel="SmolLM2-135M=/tmp/quant/smollm2_gptq,/tmp/quant/smollm2_awq" --out=docs/quant_orderings.png

Each --panel is `TITLE=DIR[,DIR...]`: the results.json files that `experiments/quantize.py --out=DIR` wrote for one
model (their rows are merged; a recipe met twice must have the same perplexity, the runs being deterministic).
The calibrated recipes of `quant.calib_recipes` become one line per method through their W3 and W4 points (x: the
bits per weight of the quantized kernels, scales included, with codes counted at their format's width: int3 codes
are stored in 4-bit containers, so a W3 row's storage bits are one more; y: held-out perplexity, on a log axis
where it spans over 3×); the RTN formats of `quant.recipes` (int8, nvfp4, ...), where present, are labelled points;
the full-precision baseline is a dashed line; the x axis is broken between 5 and 7.6 bits when 8-bit rows are
present. Also printed: a markdown table per panel and the ordering checks of the GPTQ / AWQ papers (AWQ ≤ GPTQ ≤
RTN, act-order GPTQ ≤ GPTQ, AWQ+GPTQ against both) at each bit width.
"""

from __future__ import annotations

import json
import os
import re

from absl import app
from absl import flags

from cce_jax.quant import formats

_PANELS = flags.DEFINE_multi_string("panel", None, "TITLE=DIR[,DIR...]: results.json folders of one model.")
_OUT = flags.DEFINE_string("out", "docs/quant_orderings.png", "The PNG to write.")
flags.mark_flags_as_required(["panel"])

# method label -> recipe name pattern ({b}: the bit width), in legend order
METHODS = {
    "RTN": "rtn_w{b}_g128",
    "GPTQ": "gptq_w{b}_g128",
    "GPTQ act-order": "gptq_w{b}_g128_act",
    "AWQ": "awq_w{b}_g128",
    "AWQ+GPTQ": "awq_gptq_w{b}_g128",
}
BITS = (3, 4)
BASELINE = "fp (baseline)"
_CALIBRATED = re.compile(r"^(rtn|gptq|awq|awq_gptq)_w(\d+)_g128(_act)?$")


def code_bits(row: dict) -> float:
  """Bits per weight with the codes at their format's width (the storage bits less the container's padding)."""
  m = _CALIBRATED.match(row["recipe"])
  if not m:
    return row["bits_per_weight"]
  fmt = formats.get_format(f"int{m.group(2)}")
  return row["bits_per_weight"] - (fmt.container_bits - fmt.bits)


def load_rows(dirs: list[str]) -> dict[str, dict]:
  """recipe -> row, merged over the results.json of `dirs`; ValueError when two runs disagree on a recipe."""
  rows = {}
  for d in dirs:
    path = os.path.join(d, "results.json")
    with open(path, encoding="utf-8") as f:
      for row in json.load(f)["rows"]:
        old = rows.get(row["recipe"])
        if old is not None and abs(old["perplexity"] - row["perplexity"]) > 1e-6 * old["perplexity"]:
          raise ValueError(f"{path}: {row['recipe']} has perplexity {row['perplexity']} here and "
                           f"{old['perplexity']} in an earlier folder")
        rows[row["recipe"]] = row
  if BASELINE not in rows:
    raise ValueError(f"no {BASELINE!r} row in {dirs}")
  return rows


def orderings(rows: dict[str, dict]) -> list[tuple[str, bool, str]]:
  """(check, met, numbers) for the papers' orderings at each bit width whose recipes are all present."""
  checks = []
  pairs = [("AWQ", "GPTQ"), ("GPTQ", "RTN"), ("AWQ", "RTN"), ("GPTQ act-order", "GPTQ"), ("AWQ+GPTQ", "GPTQ"),
           ("AWQ+GPTQ", "AWQ")]
  for b in BITS:
    for lo, hi in pairs:
      a, c = rows.get(METHODS[lo].format(b=b)), rows.get(METHODS[hi].format(b=b))
      if a is None or c is None:
        continue
      checks.append((f"W{b}-g128: {lo} ≤ {hi}", a["perplexity"] <= c["perplexity"],
                     f"{a['perplexity']:.4f} vs {c['perplexity']:.4f}"))
  return checks


def table(rows: dict[str, dict]) -> str:
  """Markdown: recipe, bits/w (storage; codes), perplexity, Δ, KL mean, top-1, seconds; baseline first, then by
  bits and perplexity."""
  out = ["| recipe | bits/w stored | bits/w codes | perplexity | Δ perplexity | KL mean | top-1 | seconds |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
  rest = sorted((r for r in rows.values() if r["recipe"] != BASELINE), key=lambda r: (code_bits(r), r["perplexity"]))
  for r in [rows[BASELINE]] + rest:
    out.append(f"| {r['recipe']} | {r['bits_per_weight']:.3f} | {code_bits(r):.3f} | {r['perplexity']:.4f} | "
               f"{100 * r['perplexity_change']:+.2f}% | {r['kl']:.5f} | {100 * r['top1_agreement']:.2f}% | "
               f"{r['seconds']:.1f} |")
  return "\n".join(out)


def _draw(ax, rows: dict[str, dict]):
  """The baseline, one line per calibrated method and the RTN formats' labelled points on one axis."""
  base = rows[BASELINE]["perplexity"]
  ax.axhline(base, color="gray", ls="--", lw=1, label=f"fp32: {base:.3f}")
  for (label, pattern), marker in zip(METHODS.items(), ["o", "s", "^", "D", "v"]):
    pts = [rows[pattern.format(b=b)] for b in BITS if pattern.format(b=b) in rows]
    if pts:
      ax.plot([code_bits(r) for r in pts], [r["perplexity"] for r in pts], marker=marker, ms=5, lw=1.2, label=label)
  # int4_g128 is rtn_w4_g128 under its RTN name (calib_recipes): one point
  others = sorted((r for name, r in rows.items() if name not in (BASELINE, "int4_g128")
                   and not _CALIBRATED.match(name)), key=lambda r: (code_bits(r), r["perplexity"]))
  for i, r in enumerate(others):
    ax.scatter(code_bits(r), r["perplexity"], s=14, color="black", zorder=3)
    ax.annotate(r["recipe"], (code_bits(r), r["perplexity"]), textcoords="offset points",
                xytext=(5, 0) if i % 2 else (-5, 0), ha="left" if i % 2 else "right", va="center", fontsize=7)
  if others:
    ax.scatter([], [], s=14, color="black", label="RTN formats")


def plot(panels: list[tuple[str, dict[str, dict]]], path: str):
  """One panel per model; the x axis is broken between 5 and 7.5 bits when 8-bit rows are present."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig = plt.figure(figsize=(6.4 * len(panels), 4.8))
  outer = fig.add_gridspec(1, len(panels), wspace=0.22)
  for k, (title, rows) in enumerate(panels):
    xs = [code_bits(r) for name, r in rows.items() if name != BASELINE]
    broken = max(xs) > 6
    grid = outer[0, k].subgridspec(1, 2, width_ratios=[5, 1], wspace=0.04)
    lo = fig.add_subplot(grid[0, 0] if broken else grid[0, :])
    axes = [lo] + ([fig.add_subplot(grid[0, 1], sharey=lo)] if broken else [])
    for ax in axes:
      _draw(ax, rows)
    ppl = [r["perplexity"] for r in rows.values()]
    log = max(ppl) > 3 * min(ppl)  # a log axis only where perplexities span a wide range
    if log:
      lo.set_yscale("log")
    if broken:
      lo.set_xlim(min(xs) - 0.35, 5.0)
      axes[1].set_xlim(7.6, 8.7)
      lo.spines["right"].set_visible(False)
      axes[1].spines["left"].set_visible(False)
      axes[1].tick_params(axis="y", which="both", left=False, labelleft=False)
    else:
      lo.margins(x=0.12)
    lo.set_xlabel("bits per weight (quantized kernels: codes at their width, scales included)", fontsize=8)
    lo.set_ylabel("perplexity (held-out tokens" + (", log scale)" if log else ")"))
    lo.set_title(title, fontsize=10)
    lo.legend(fontsize=7)
  fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.93)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  panels = []
  for spec in _PANELS.value:
    title, sep, dirs = spec.partition("=")
    if not sep or not dirs:
      raise app.UsageError(f"--panel={spec!r}: expected TITLE=DIR[,DIR...]")
    rows = load_rows(dirs.split(","))
    panels.append((title, rows))
    print(f"## {title}\n\n{table(rows)}\n")
    for check, met, numbers in orderings(rows):
      print(f"- {check}: {'met' if met else 'MISSED'} ({numbers})")
    print()
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  plot(panels, _OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
