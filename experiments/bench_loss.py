r"""Benchmark of the fused loss against the materialised one, following the "Protocol" section of BENCHMARKS.md.

  python experiments/bench_loss.py --shapes=gemma2_2b,llama3_8b_4k --regimes=lm_like,peaked --out=/tmp/bench

Every method runs in this one process on the same inputs: median time of the forward and of loss + gradient
(>= 20 timed runs after a warm-up, blocking on the results), effective TFLOP/s, the temporary memory of the
compiled loss + gradient program, and the relative L2 error of loss, dE and dC against the fp32 reference
(upcast inputs, HIGHEST precision). Each input's statistics (mean loss and entropy, share of softmax entries
>= 2^-12, ...; regime_stats on its first 512 tokens) are printed before its methods and stored in its rows.
Prints a table of the inputs' statistics and one of the methods last, and writes JSON to --out.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/
# pylint: disable=wrong-import-position
from benchmarks.linear_cross_entropy import lm_like
from benchmarks.linear_cross_entropy import regime_stats
from benchmarks.linear_cross_entropy import torch_anchors
from benchmarks.linear_cross_entropy.harness import loss_fn
from benchmarks.linear_cross_entropy.harness import median_ms
from benchmarks.linear_cross_entropy.harness import rel_err
from benchmarks.linear_cross_entropy.inputs import REGIMES
from benchmarks.linear_cross_entropy.inputs import SHAPES
from benchmarks.linear_cross_entropy.inputs import load_lm
from benchmarks.linear_cross_entropy.inputs import make_inputs
import provenance  # experiments/provenance.py (this folder is on sys.path when run as a script)

JAX_METHODS = ("naive", "xla_chunked", "xla_fused", "xla_fused_exact", "pallas_gpu", "pallas_gpu_sparse",
               "pallas_gpu_sorted", "pallas_gpu_triton", "pallas_gpu_lowmem", "pallas_gpu_full",
               "pallas_gpu_full_recompute", "pallas_gpu_exact", "pallas_tpu", "pallas_tpu_split", "pallas_tpu_filtered")
METHODS = JAX_METHODS + torch_anchors.ANCHORS

_SHAPES = flags.DEFINE_list("shapes", ["gemma2_2b"], f"Shapes from {sorted(SHAPES)}.")
_REGIMES = flags.DEFINE_list(
    "regimes", ["random", "peaked"],
    "Input regimes: random, peaked, lm_like (a trained LM's statistics, --lm_like_entropy), lm (needs --lm_file; "
    "ignores --shapes).")
_LM_LIKE_ENTROPY = flags.DEFINE_float("lm_like_entropy", lm_like.DEFAULT_ENTROPY,
                                      "Mean softmax entropy (nats) of the lm_like regime.")
_LM_FILE = flags.DEFINE_string("lm_file", None, "An .npz from experiments/dump_hidden.py for the lm regime.")
_METHODS = flags.DEFINE_list(
    "methods", list(METHODS),
    f"Methods from {METHODS}; the PyTorch anchors ({', '.join(torch_anchors.ANCHORS)}) are skipped with a note "
    "where torch, a CUDA GPU or their package is missing.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs per measurement.")
_ACCURACY = flags.DEFINE_bool("accuracy", True, "Compare against the fp32 reference (needs N×V fp32 memory).")
_OUT = flags.DEFINE_string("out", None, "Folder for results.json.")
STATS_TOKENS = 512  # tokens whose softmax statistics describe the inputs


def run_one(shape_name, regime, methods, dtype, repeats, accuracy):
  if regime == "lm":
    e, c, targets = load_lm(_LM_FILE.value, dtype)
    (n, d), v, softcap = e.shape, c.shape[0], None
    shape_name = f"lm:{os.path.basename(_LM_FILE.value)}"
  else:
    n, d, v, softcap = SHAPES[shape_name]
    entropy = _LM_LIKE_ENTROPY.value if regime == "lm_like" else None
    e, c, targets = make_inputs(n, d, v, dtype, regime, entropy=entropy, softcap=softcap)
  sample = (e[:STATS_TOKENS], c, targets[:STATS_TOKENS], softcap)
  stats = {f"regime_{k}": x for k, x in regime_stats.regime_stats(*sample).items()}
  if regime == "lm_like":
    stats["lm_like_entropy"] = _LM_LIKE_ENTROPY.value
  print(json.dumps(dict(shape=shape_name, regime=regime, **stats)), flush=True)
  gemm_tflop = 2 * n * d * v / 1e12
  ref = None
  if accuracy:
    ref_fn = jax.jit(jax.value_and_grad(loss_fn("reference", softcap), argnums=(0, 1)))
    ref_loss, (ref_de, ref_dc) = ref_fn(e.astype(jnp.float32), c.astype(jnp.float32), targets)
    ref = (ref_loss, ref_de, ref_dc)
    del ref_fn
  rows = []
  for method in methods:
    if method in torch_anchors.ANCHORS:
      measure = lambda with_results, m=method: torch_anchors.measure(m, e, c, targets, softcap, repeats)
    else:
      measure = _jax_measure(method, softcap, e, c, targets, repeats)
    row = dict(shape=shape_name, regime=regime, method=method, n=n, d=d, v=v, softcap=softcap, **stats)
    rows.append(_fill_row(row, measure, gemm_tflop, ref))
  return rows


def _jax_measure(method, softcap, e, c, targets, repeats):
  """Timing of one JAX method; its memory column is the loss + gradient program's XLA temporaries."""

  def measure(with_results):
    f = loss_fn(method, softcap)
    fwd = jax.jit(f)
    both = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    temp = both.lower(e, c, targets).compile().memory_analysis().temp_size_in_bytes
    fwd_ms = median_ms(fwd, (e, c, targets), repeats)
    fwd_bwd_ms = median_ms(both, (e, c, targets), repeats)
    results = None
    if with_results:
      loss, (de, dc) = both(e, c, targets)
      results = (loss, de, dc)
    return fwd_ms, fwd_bwd_ms, temp / 2**20, results

  return measure


def _fill_row(row, measure, gemm_tflop, ref):
  """Times, throughput, memory and errors of one method into `row` (or the error it raised); prints it.

  measure(with_results) -> (fwd ms, fwd+bwd ms, memory MiB, (loss, dE, dC) or None). For the PyTorch anchors the
  memory is torch's extra peak (`torch_anchors.measure`), for JAX methods the XLA temporaries.
  """
  try:
    fwd_ms, fwd_bwd_ms, mem_mib, results = measure(ref is not None)
    row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, bwd_ms=fwd_bwd_ms - fwd_ms,
               fwd_tflops=gemm_tflop / fwd_ms * 1e3, fwd_bwd_tflops=3 * gemm_tflop / fwd_bwd_ms * 1e3,
               temp_mib=mem_mib)
    if ref is not None:
      loss, de, dc = results
      row.update(err_loss=rel_err(loss, ref[0]), err_de=rel_err(de, ref[1]), err_dc=rel_err(dc, ref[2]))
  except Exception as err:  # pylint: disable=broad-except
    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
  print(json.dumps(row), flush=True)
  return row


def regime_table(rows):
  """The inputs' statistics (regime_stats' table), one line per (shape, regime)."""
  lines = [regime_stats.TABLE_HEADER]
  for r in {(r["shape"], r["regime"]): r for r in rows}.values():
    lines.append(regime_stats.table_line(r["shape"], r["regime"], {k[len("regime_"):]: x for k, x in r.items()
                                                                   if k.startswith("regime_")}))
  return "\n".join(lines)


def table(rows):
  lines = ["| shape | regime | method | fwd ms | fwd+bwd ms | bwd ms | fwd TFLOP/s | temp MiB | err loss | err dE "
           "| err dC |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['shape']} | {r['regime']} | {r['method']} | error: {r['error'][:80]} |")
      continue
    errs = [f"{r[k]:.2e}" if k in r else "-" for k in ("err_loss", "err_de", "err_dc")]
    lines.append(f"| {r['shape']} | {r['regime']} | {r['method']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                 f"{r['bwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['temp_mib']:.1f} | {' | '.join(errs)} |")
  return "\n".join(lines)


def _check_flags():
  """One-line usage errors before anything runs."""
  for m in _METHODS.value:
    if m not in METHODS:
      raise app.UsageError(f"unknown method {m!r}; choose from {METHODS}")
  for regime in _REGIMES.value:
    if regime not in REGIMES + ("lm",):
      raise app.UsageError(f"unknown regime {regime!r}; choose from {REGIMES + ('lm',)}")
  for shape_name in _SHAPES.value:
    if shape_name not in SHAPES:
      raise app.UsageError(f"unknown shape {shape_name!r}; choose from {sorted(SHAPES)}")
    if "lm_like" in _REGIMES.value:
      try:
        lm_like.check_entropy(_LM_LIKE_ENTROPY.value, SHAPES[shape_name][2])
      except ValueError as err:
        raise app.UsageError(f"--lm_like_entropy at {shape_name}: {err}") from None
  if "lm" in _REGIMES.value and not _LM_FILE.value:
    raise app.UsageError("the lm regime needs --lm_file (write one with experiments/dump_hidden.py)")


def main(argv):
  del argv
  _check_flags()
  anchors = torch_anchors.available()
  methods = [m for m in _METHODS.value if m in JAX_METHODS or m in anchors]
  for m in sorted(set(_METHODS.value) - set(methods)):
    print(f"skipping {m}: torch with CUDA or its package is not importable here", flush=True)
  platform = jax.default_backend()
  for m in [m for m in methods if m.split("_")[0] == "pallas" and m.split("_")[1] != platform]:
    methods.remove(m)
    print(f"skipping {m}: its kernels need a {m.split('_')[1].upper()}, this is {platform}", flush=True)
  dtype = jnp.dtype(_DTYPE.value)
  device = jax.devices()[0].device_kind
  header = f"{device}, jax {jax.__version__}, commit {provenance.commit()}, dtype {dtype.name}"
  if anchors:
    header += ", " + ", ".join(f"{k} {v}" for k, v in sorted(anchors.items()))
  print(header, flush=True)
  rows = []
  for shape_name in _SHAPES.value:
    for regime in _REGIMES.value:
      if regime != "lm":
        rows += run_one(shape_name, regime, methods, dtype, _REPEATS.value, _ACCURACY.value)
  if "lm" in _REGIMES.value:
    rows += run_one(None, "lm", methods, dtype, _REPEATS.value, _ACCURACY.value)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
      json.dump(dict(device=device, jax=jax.__version__, commit=provenance.commit(), dtype=dtype.name,
                     anchors=anchors, rows=rows), f, indent=2)
  print()
  print(header)
  print(regime_table(rows))
  print()
  print(table(rows))


if __name__ == "__main__":
  app.run(main)
