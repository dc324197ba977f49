r"""Benchmark: cce_jax's `quant.gptq` against a PyTorch GPTQ layer (`gptq_torch.py`, the IST-DASLab algorithm) and
round-to-nearest, on the same matrices: time, reconstruction error and how many integer codes agree.

    python benchmarks/quant/gptq_vs_torch.py                      # on a GPU: one 4096 x 4096 layer, 2048 tokens
    python benchmarks/quant/gptq_vs_torch.py --d_in=512 --d_out=384 --tokens=1024 --json=/tmp/gvt.json  # CPU

Inputs: `gptq_layer.make_layer` (seed 0): X [tokens, d_in] correlated with 1% outlier input channels ×20,
W [d_in, d_out] standard normal, H = 2XᵀX/n; torch gets copies of the same W and H (float32, on the GPU when
torch.cuda is available, else the CPU). Variants, for each format of --fmts (int4, int3 by default) with groups of
--group_size along d_in: plain GPTQ (dynamic groups) and act-order with static groups; RTN as the baseline.

Timed: jax — `jax.jit(quant.gptq)` compiled once, the median of --repeats calls blocked on the result after two
warm-ups (`timing.median_ms`); torch — the median of --repeats calls, each ended by `torch.cuda.synchronize()`,
after one warm-up. Both take W and H on the device and return the codes. Columns: ms of each, the relative output
error ‖XW − XŴ‖_F / ‖XW‖_F on X (fp32, HIGHEST precision, computed by jax for both), and the fraction of integer
codes equal between the two implementations (stored form, original input order); then the peak device memory
(jax: the process's, from `memory_stats`; torch: the largest per-method `max_memory_allocated`). Codes differ where float
rounding order moves a value across a rounding tie, and then along that output row's later columns (GPTQ feeds
each column's error forward).

torch is optional: without it the torch columns read "-". Run from the repository root with cce_jax installed
(`pip install -e .`); the script puts the root on sys.path itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

if not __package__:  # run as a script: the repository root on sys.path for `benchmarks.*`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # leave torch half of the GPU

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks.quant import gptq_layer  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.quant import gptq_torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from cce_jax import quant  # pylint: disable=g-import-not-at-top,wrong-import-position
from cce_jax.ops.linear_cross_entropy.timing import median_ms  # pylint: disable=wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--d_in", type=int, default=4096, help="Input features (the contraction axis).")
  p.add_argument("--d_out", type=int, default=4096, help="Output features.")
  p.add_argument("--tokens", type=int, default=2048, help="Calibration tokens n of X and H.")
  p.add_argument("--fmts", default="int4,int3", help="Comma-separated integer formats.")
  p.add_argument("--group_size", type=int, default=128, help="Group size along d_in (must divide it).")
  p.add_argument("--block_size", type=int, default=128, help="Lazy-update block size.")
  p.add_argument("--damp", type=float, default=0.01, help="Damping, as a fraction of mean(diag H).")
  p.add_argument("--repeats", type=int, default=3, help="Timed calls per method and implementation.")
  p.add_argument("--torch_device", default="auto", help="'auto' (cuda if available, else cpu), 'cuda' or 'cpu'.")
  p.add_argument("--json", default=None, help="Optional JSON file for the header and the rows.")
  return p.parse_args(argv)


def dense_rel_error(x, w, w_hat) -> float:
  """‖X(W − Ŵ)‖_F / ‖XW‖_F in float32 with HIGHEST-precision products (what `gptq_layer.rel_error` computes)."""
  hi = jax.lax.Precision.HIGHEST
  w_hat = jnp.asarray(w_hat, jnp.float32)
  diff = jnp.dot(x, w - w_hat, precision=hi)
  return float(jnp.linalg.norm(diff) / jnp.linalg.norm(jnp.dot(x, w, precision=hi)))


def jax_codes(q) -> np.ndarray:
  """The QArray's integer codes [N, K] (stored form), K the contraction axis in its original order."""
  codes = quant.qarray.unpack(q.values, q.fmt.container_bits, q.blocked_shape[-1])
  k, n = q.shape
  return np.asarray(codes).reshape(n, k)


def torch_median_ms(fn, repeats, sync):
  """(median ms of `repeats` calls of fn() each followed by sync(), after one warm-up; the last result)."""
  out = fn()
  sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    sync()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times)), out


def _torch_setup(name):
  """(torch module or None, torch.device or None, sync function)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, None, lambda: None
  torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, as IST sets (and jax's HIGHEST)
  if name == "auto":
    name = "cuda" if torch.cuda.is_available() else "cpu"
  dev = torch.device(name)
  return torch, dev, (torch.cuda.synchronize if dev.type == "cuda" else lambda: None)


def _cell(value, spec) -> str:
  return "-" if value is None else format(value, spec)


def variants(fmts, g):
  """[(row name, fmt name, act_order)] : plain GPTQ then act-order with static groups, per format."""
  out = []
  for fmt in fmts:
    out.append((f"rtn {fmt} g{g}", fmt, None))
    out.append((f"gptq {fmt} g{g}", fmt, False))
    out.append((f"gptq {fmt} g{g} act-order static", fmt, True))
  return out


def run(args) -> dict:
  """Runs every variant; prints the table as it goes and returns the header and rows."""
  k, n, g = args.d_in, args.d_out, args.group_size
  if k % g:
    raise ValueError(f"--group_size={g} must divide --d_in={k}")
  fmts = [f.strip() for f in args.fmts.split(",") if f.strip()]
  torch, tdev, sync = _torch_setup(args.torch_device)
  x, w, h = gptq_layer.make_layer(k, n, args.tokens)
  if torch is not None:
    w_t = torch.from_numpy(np.array(w)).to(tdev)
    h_t = torch.from_numpy(np.array(h)).to(tdev)
  jdev = jax.devices()[0]
  header = {
      "jax_device": f"{jdev.device_kind} ({jdev.platform})", "jax": jax.__version__,
      "torch": None if torch is None else torch.__version__,
      "torch_device": None if torch is None else (
          torch.cuda.get_device_name(tdev) if tdev.type == "cuda" else "cpu"),
      "commit": gptq_layer._commit(),  # pylint: disable=protected-access
      "d_in": k, "d_out": n, "tokens": args.tokens, "group_size": g, "block_size": args.block_size,
      "damp": args.damp, "repeats": args.repeats}
  print(f"jax {header['jax']} on {header['jax_device']}; torch {header['torch']} on {header['torch_device']}; "
        f"commit {header['commit']}")
  print(f"layer {k} x {n}, {args.tokens} tokens, group {g}, block {args.block_size}, damp {args.damp}, "
        f"median of {args.repeats}")
  print("| method | jax ms | torch ms | jax rel. err | torch rel. err | codes equal |")
  print("|---|---|---|---|---|---|")
  rows = []
  for name, fmt_name, act in variants(fmts, g):
    fmt = quant.get_format(fmt_name)
    spec = gptq_torch.IntSpec(fmt.bits, fmt.signed, fmt.divisor)
    if act is None:
      jfn = jax.jit(functools.partial(quant.quantize, fmt=fmt_name, axis=0, group_size=g))
      jargs = (w,)
      tfn = lambda: gptq_torch.rtn(w_t, spec, g)  # pylint: disable=cell-var-from-loop
    else:
      opts = dict(group_size=g, act_order=act, static_groups=act, damp=args.damp, block_size=args.block_size)
      jfn = jax.jit(functools.partial(quant.gptq, fmt=fmt_name, **opts))
      jargs = (w, h)
      tfn = lambda: gptq_torch.gptq(w_t, h_t, spec, **opts)  # pylint: disable=cell-var-from-loop
    jms = median_ms(jfn, jargs, args.repeats)
    q = jfn(*jargs)
    row = {"method": name, "jax_ms": jms, "jax_rel_err": dense_rel_error(x, w, q.dequantize()),
           "torch_ms": None, "torch_rel_err": None, "codes_equal": None, "torch_peak_mib": None}
    if torch is not None:
      if tdev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tdev)
      tms, (t_codes, t_deq) = torch_median_ms(tfn, args.repeats, sync)
      row.update(torch_ms=tms, torch_rel_err=dense_rel_error(x, w, t_deq.cpu().numpy()),
                 codes_equal=float(np.mean(jax_codes(q) == t_codes.cpu().numpy())),
                 torch_peak_mib=torch.cuda.max_memory_allocated(tdev) / 2**20 if tdev.type == "cuda" else None)
    rows.append(row)
    print(f"| {name} | {row['jax_ms']:.1f} | {_cell(row['torch_ms'], '.1f')} | {row['jax_rel_err']:.4e} | "
          f"{_cell(row['torch_rel_err'], '.4e')} | {_cell(row['codes_equal'], '.4f')} |", flush=True)
  stats = jdev.memory_stats() or {}
  header["jax_peak_mib"] = stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None
  torch_peak = max((r["torch_peak_mib"] or 0.0 for r in rows), default=0.0)
  print(f"peak device memory (MiB): jax {_cell(header['jax_peak_mib'], '.0f')} (whole process), "
        f"torch {_cell(torch_peak or None, '.0f')}")
  return {**header, "rows": rows}


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
