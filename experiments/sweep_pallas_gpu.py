r"""Times the pallas_gpu kernels over a set of tile configs at one benchmark shape (for choosing defaults).

  python experiments/sweep_pallas_gpu.py --shape=gemma2_2b --regime=peaked \
      --configs=64x128x64w4s3,128x128x64w8s3,128x256x64w8s3

A config is `{block_n}x{block_v}x{block_d}w{num_warps}s{num_stages}`, optionally followed by `p{num_splits}` and
`f` (flat forward loop); `w4/8` means 4 warps in the forward, 8 in the backward. Prints one row per config:
forward and loss + gradient medians, and the errors against the fp32 reference.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import cce_jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/
# pylint: disable=wrong-import-position
from benchmarks.linear_cross_entropy import harness
from benchmarks.linear_cross_entropy import inputs

_SHAPE = flags.DEFINE_string("shape", "gemma2_2b", "Shape name from benchmarks/linear_cross_entropy/inputs.py.")
_REGIME = flags.DEFINE_string("regime", "peaked", "Input regime.")
_CONFIGS = flags.DEFINE_list("configs", ["64x128x64w4s3", "128x128x64w8s3"], "Tile configs to time.")
_FILTER = flags.DEFINE_list("filter_eps", ["auto"], "filter_eps values to try ('auto', 'none' or floats).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per measurement.")


def parse_config(text):
  m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)(?:/(\d+))?s(\d+)(?:p(\d+))?(f?)", text)
  if not m:
    raise ValueError(f"bad config {text!r}")
  bn, bv, bd, w, bw, s, p, flat = m.groups()
  return cce_jax.PallasGpuConfig(int(bn), int(bv), int(bd), int(w), int(s), int(p) if p else None,
                                 flat_loop=bool(flat), backward_warps=int(bw) if bw else None)


def main(argv):
  del argv
  n, d, v, softcap = inputs.SHAPES[_SHAPE.value]
  e, c, t = inputs.make_inputs(n, d, v, jnp.bfloat16, _REGIME.value, softcap=softcap)
  ref_loss, (ref_de, ref_dc) = jax.jit(jax.value_and_grad(
      harness.loss_fn("reference", softcap), argnums=(0, 1)))(e.astype(jnp.float32), c.astype(jnp.float32), t)
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__} {_SHAPE.value} {_REGIME.value}", flush=True)
  lines = ["| config | filter_eps | fwd ms | fwd+bwd ms | err loss | err dE | err dC |",
           "|---|---|---|---|---|---|---|"]
  runs = [(t, f) for t in _CONFIGS.value for f in _FILTER.value]
  for text, feps in runs:
    feps_value = {"auto": "auto", "none": None}.get(feps) if feps in ("auto", "none") else float(feps)
    cfg = parse_config(text)
    f = lambda e, c: cce_jax.linear_cross_entropy(e, c, t, softcap=softcap, implementation="pallas_gpu",
                                                  config=cfg, filter_eps=feps_value)
    try:
      fwd = jax.jit(f)
      both = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
      fwd_ms = harness.median_ms(fwd, (e, c), _REPEATS.value)
      both_ms = harness.median_ms(both, (e, c), _REPEATS.value)
      loss, (de, dc) = both(e, c)
      errs = [harness.rel_err(x, r) for x, r in ((loss, ref_loss), (de, ref_de), (dc, ref_dc))]
      line = (f"| {text} | {feps} | {fwd_ms:.2f} | {both_ms:.2f} | "
              + " | ".join(f"{x:.2e}" for x in errs) + " |")
    except Exception as err:  # pylint: disable=broad-except
      line = f"| {text} | {feps} | error: {type(err).__name__}: {str(err)[:200]} |"
    print(line, flush=True)
    lines.append(line)
  print()
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
