"""Named recipes on one model: quantize, evaluate against the full-precision model, write the results.

`compare(model, tokens, recipes, seq_len=...)` computes the full-precision `Baseline` once, then for each recipe
runs `quantize_params` → `dequantize_params` → `evaluate` (the quantized model computes with the dequantized
weights: the same forward as on-the-fly dequantization) and returns one row per recipe, the baseline first:

  recipe, perplexity, perplexity_change (relative to the baseline), kl (mean KL(P ‖ Q), nats/token), kl_median,
  kl_p99, kl_max, top1_agreement, delta_p_rms, bits_per_weight (storage bits per element of the quantized
  kernels: codes, scales, zero points), bits_per_weight_all (of every parameter, the full-precision embeddings,
  norms and head included), param_bytes, tokens, seconds (quantize + evaluate; the baseline's own forward pass).

Group sizes that do not divide an axis. A recipe's int group size g (int4_g128, uint4_g128) must divide the
contraction axis; SmolLM2-135M's width 576 is not a multiple of 128. `fitted_rules` then quantizes that parameter
with the largest divisor of the axis below g (576: 96) through a rule of its own in front of the recipe, and the
row's "notes" say so. llama.cpp does the like: tensors whose rows are not a multiple of its 256-element K-quant
blocks fall back to another block type.

`write(out, rows, meta)` writes out/results.json ({"meta", "rows"}), out/results.md (a table) and
out/perplexity_vs_bits.png (needs matplotlib, the `plots` extra; skipped with a warning without it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from cce_jax.quant import calib_recipes
from cce_jax.quant import params as params_lib
from cce_jax.quant import recipes as recipes_lib
from cce_jax.quant.evaluate import baseline as make_baseline
from cce_jax.quant.evaluate import evaluate

BASELINE = "fp (baseline)"


def resolve(names: str | list[str]) -> list[str]:
  """"all" or comma-separated names (or a list) as known recipe names; ValueError naming an unknown one.

  "all" means the RTN recipes (`quant.recipes`); the calibrated ones (`quant.calib_recipes`) are named one by one."""
  if isinstance(names, str):
    names = list(recipes_lib.names()) if names.strip() == "all" else [n.strip() for n in names.split(",")]
  names = [n for n in names if n]
  if not names:
    raise ValueError("no recipe given (names, comma-separated, or 'all')")
  unknown = [n for n in names if n not in recipes_lib.names() + calib_recipes.names()]
  if unknown:
    raise ValueError(f"unknown recipe {unknown[0]!r}; known: {', '.join(recipes_lib.names())} (or 'all'); "
                     f"calibrated: {', '.join(calib_recipes.names())}")
  return names


def _with_params(model, params):
  copy = nnx.clone(model)  # not split + merge: with flax 0.12 the merged copy shares model's Variables
  nnx.update(copy, params)
  return copy


def _quantized_bits(report) -> float:
  rows = [r for r in report["params"].values() if r["format"] is not None]
  elements = sum(math.prod(r["shape"]) for r in rows)
  return sum(r["after_bits"] for r in rows) / elements if elements else float("nan")


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def fitted_rules(params, name: str) -> tuple[tuple, list[str]]:
  """The named recipe's rules, and in front of them one rule per parameter whose int group size does not divide its
  contraction axis (module docstring); also the notes, one per (pattern, axis size, new group)."""
  rules = recipes_lib.get(name) if name in recipes_lib.names() else calib_recipes.rules(name)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  extra, notes = [], {}
  for path, x in leaves:
    path = params_lib.path_str(path)
    rule = next((r for r in rules if r.matches(path)), None)
    if rule is None or rule.format is None or not isinstance(rule.group_size, int):
      continue
    if not -x.ndim <= rule.axis < x.ndim:
      continue  # quantize_params names the parameter
    n = x.shape[rule.axis]
    if (rule.clip_group and rule.group_size >= n) or n % rule.group_size == 0:
      continue
    g = _largest_divisor(n, rule.group_size)
    extra.append(recipes_lib.Rule(re.escape(path), rule.format, axis=rule.axis, group_size=g))
    notes[(rule.pattern, n, g)] = (f"`{rule.pattern}` (axis of {n}): groups of {g}, since {rule.group_size} does "
                                   f"not divide {n}")
  return tuple(extra) + rules, list(notes.values())


def baseline_row(params, base) -> dict:
  """`compare`'s full-precision row from the model's Params (a pure dict) and its `evaluate.baseline`."""
  nll = -np.concatenate([np.asarray(lp).reshape(-1) for lp in base.logprobs]).astype(np.float64)
  bits = sum(x.size * x.dtype.itemsize * 8 for x in jax.tree.leaves(params))
  elements = sum(x.size for x in jax.tree.leaves(params))
  return {"recipe": BASELINE, "perplexity": math.exp(nll.mean()), "perplexity_change": 0.0, "kl": 0.0,
          "kl_median": 0.0, "kl_p99": 0.0, "kl_max": 0.0, "top1_agreement": 1.0, "delta_p_rms": 0.0,
          "bits_per_weight": bits / elements, "bits_per_weight_all": bits / elements, "param_bytes": bits / 8,
          "tokens": int(nll.size), "seconds": base.seconds, "notes": []}


def recipe_row(name: str, res: dict, report: dict, seconds: float, notes: list) -> dict:
  """`compare`'s row of recipe `name` from its `evaluate` result and its `params.size_report`."""
  return {"recipe": name, "perplexity": res["perplexity_q"], "perplexity_change": res["perplexity_change"],
          "kl": res["kl_mean"], "kl_median": res["kl_median"], "kl_p99": res["kl_p99"], "kl_max": res["kl_max"],
          "top1_agreement": res["top1_agreement"], "delta_p_rms": res["delta_p_rms"],
          "bits_per_weight": _quantized_bits(report), "bits_per_weight_all": report["total"]["bits_per_weight"],
          "param_bytes": report["total"]["after_bytes"], "tokens": res["tokens"], "seconds": seconds,
          "notes": notes}


def compare(model, tokens, recipe_names, *, seq_len: int | None = None, batch_size: int = 8,
            chunk_tokens: int = 256, on_row: Callable[[int, int, dict], None] | None = None,
            on_batch: Callable[[str, dict], None] | None = None, calib_tokens=None) -> list[dict]:
  """Rows (module docstring) for the baseline and each recipe in `recipe_names`, on `tokens` (as `evaluate`).

  Calibrated recipes (`quant.calib_recipes`: gptq_*, awq_*) are calibrated on `calib_tokens` (token ids that
  `tokens` does not hold; `calib_recipes.split_calibration`); their rows' seconds include the calibration.

  on_row(i, n, row) is called after each row (i = 0 for the baseline); on_batch(recipe, progress) after each batch.
  """
  names = resolve(recipe_names)
  calibrated = [n for n in names if calib_recipes.needs_calibration(n)]
  if calibrated and calib_tokens is None:
    raise ValueError(f"recipe {calibrated[0]!r} needs calibration tokens")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  base = make_baseline(model, tokens, seq_len=seq_len, batch_size=batch_size)
  rows = [baseline_row(params, base)]
  if on_row:
    on_row(0, len(names), rows[0])
  for i, name in enumerate(names, 1):
    t0 = time.perf_counter()
    rules, notes = fitted_rules(params, name)
    if calib_recipes.needs_calibration(name):
      qmodel = calib_recipes.quantize(model, name, calib_tokens, seq_len=seq_len, batch_size=batch_size)
      qparams = nnx.to_pure_dict(nnx.state(qmodel, nnx.Param))
    else:
      qparams = params_lib.quantize_params(params, rules)
    report = params_lib.size_report(params, qparams)
    model_q = _with_params(model, params_lib.dequantize_params(qparams))
    res = evaluate(base, model_q, base.windows, chunk_tokens=chunk_tokens,
                   progress=None if on_batch is None else (lambda p, name=name: on_batch(name, p)))
    rows.append(recipe_row(name, res, report, time.perf_counter() - t0, notes))
    if on_row:
      on_row(i, len(names), rows[-1])
  return rows


def progress_line(i: int, n: int, row: dict) -> str:
  """One line per row: "[2/7] int4_g128: ppl 12.345 (+1.23%) KL 0.01234 top-1 97.1% 4.25 bits/weight 12.3 s"."""
  return (f"[{i}/{n}] {row['recipe']}: ppl {row['perplexity']:.4f} ({100 * row['perplexity_change']:+.2f}%) "
          f"KL {row['kl']:.5f} top-1 {100 * row['top1_agreement']:.2f}% {row['bits_per_weight']:.2f} bits/weight "
          f"{row['seconds']:.1f} s")


def markdown(rows: list[dict], meta: dict) -> str:
  """results.md: what was measured, then the table."""
  head = [f"# Quantization (round to nearest): {meta.get('model', '')}", ""]
  head += [f"- {k}: {v}" for k, v in meta.items() if k != "model"]
  head += ["", "| recipe | bits/weight (quantized) | bits/weight (all) | perplexity | Δ perplexity | KL mean | "
           "KL median | KL p99 | top-1 agreement | RMS Δp | seconds |", "|---" * 11 + "|"]
  for r in rows:
    head.append(f"| {r['recipe']} | {r['bits_per_weight']:.3f} | {r['bits_per_weight_all']:.3f} | "
                f"{r['perplexity']:.4f} | {100 * r['perplexity_change']:+.3f}% | {r['kl']:.6f} | "
                f"{r['kl_median']:.6f} | {r['kl_p99']:.5f} | {100 * r['top1_agreement']:.2f}% | "
                f"{100 * r['delta_p_rms']:.3f}% | {r['seconds']:.1f} |")
  notes = [f"- {r['recipe']}: {n}" for r in rows for n in r.get("notes", [])]
  return "\n".join(head + ([""] + notes if notes else [])) + "\n"


def plot(rows: list[dict], path: str, title: str) -> bool:
  """Perplexity against bits per weight of the quantized kernels; False (and a warning) without matplotlib."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.warning("matplotlib is not installed (pip install 'cce_jax[plots]'): no plot written")
    return False
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  base = rows[0]
  ax.axhline(base["perplexity"], color="gray", ls="--", lw=1, label=f"{base['recipe']}: {base['perplexity']:.3f}")
  for i, r in enumerate(sorted(rows[1:], key=lambda r: (r["bits_per_weight"], r["perplexity"]))):
    ax.scatter(r["bits_per_weight"], r["perplexity"], s=25)
    # neighbours at the same bits (int8 / fp8, nvfp4 / nf4) get their labels on opposite sides
    ax.annotate(r["recipe"], (r["bits_per_weight"], r["perplexity"]), textcoords="offset points",
                xytext=(6, 0) if i % 2 else (-6, 0), ha="left" if i % 2 else "right", va="center", fontsize=8)
  ax.margins(x=0.15)
  ax.set_xlabel("bits per weight (quantized kernels, scales included)")
  ax.set_ylabel("perplexity (held-out tokens)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write(out: str, rows: list[dict], meta: dict) -> list[str]:
  """Writes results.json, results.md and (with matplotlib) perplexity_vs_bits.png into `out`; returns the paths."""
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, "results.json"), os.path.join(out, "results.md")]
  with open(paths[0], "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(paths[1], "w", encoding="utf-8") as f:
    f.write(markdown(rows, meta))
  png = os.path.join(out, "perplexity_vs_bits.png")
  if plot(rows, png, str(meta.get("model", ""))):
    paths.append(png)
  return paths
