r"""Benchmark: GPTQ of one layer with its Hessian given, against round-to-nearest on the same weights.

    python -m benchmarks.quant.gptq_layer                 # on a GPU: one 4096 x 4096 layer, int4 g128 (target ≤ 1 s)
    python -m benchmarks.quant.gptq_layer --small         # 256 x 256, runs on CPU in seconds
    python -m benchmarks.quant.gptq_layer --fmt=int3 --act_order --static_groups --out=/tmp/gptq.json

Inputs, drawn once on the device (seed 0): X [tokens, K] correlated (standard normal times I + 0.3·noise/√K)
with 1% outlier input channels ×20, W [K, N] standard normal, H = 2XᵀX/n from `quant.hessian_update`. Timed: the
eager `quant.gptq` call (the Cholesky with its finiteness check, then the column sweep), blocked on its result,
median of `--repeats` after two warm-up calls; RTN (`quant.quantize`) alike. Columns: method, ms, and the relative
reconstruction error ‖X(W − Ŵ)‖ / ‖XW‖ (fp32, HIGHEST precision).
"""

from __future__ import annotations

import json
import subprocess

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from cce_jax import quant
from cce_jax.ops.linear_cross_entropy.timing import median_ms

_K = flags.DEFINE_integer("k", 4096, "Input features (the contraction axis).")
_N = flags.DEFINE_integer("n", 4096, "Output features.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Calibration tokens for the Hessian.")
_FMT = flags.DEFINE_string("fmt", "int4", "Integer format.")
_GROUP = flags.DEFINE_string("group_size", "128", "An int, or 'channel'.")
_ACT_ORDER = flags.DEFINE_bool("act_order", False, "Act-order (with an int group size, pass --static_groups too).")
_STATIC = flags.DEFINE_bool("static_groups", False, "Group scales from the original weights.")
_BLOCK = flags.DEFINE_integer("block_size", 128, "Lazy-update block size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per method.")
_SMALL = flags.DEFINE_bool("small", False, "K = N = 256, 1024 tokens, group 32 (CPU).")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the rows.")


def make_layer(k, n, tokens):
  """(X [tokens, K], W [K, N], H [K, K]) float32 on the default device, seed 0."""
  kx, kw, km = jax.random.split(jax.random.key(0), 3)
  mix = jnp.eye(k) + 0.3 * jax.random.normal(km, (k, k)) / jnp.sqrt(k)
  x = jnp.dot(jax.random.normal(kx, (tokens, k)), mix, precision=jax.lax.Precision.HIGHEST)
  x = x.at[:, :: 100].multiply(20.0)
  w = jax.random.normal(kw, (k, n))
  return x, w, quant.hessian_update(quant.hessian_init(k), x).hessian


def rel_error(x, w, q) -> float:
  hi = jax.lax.Precision.HIGHEST
  diff = jnp.dot(x, w - q.dequantize(), precision=hi)
  return float(jnp.linalg.norm(diff) / jnp.linalg.norm(jnp.dot(x, w, precision=hi)))


def _commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv):
  del argv
  k, n, tokens = (256, 256, 1024) if _SMALL.value else (_K.value, _N.value, _TOKENS.value)
  group = "channel" if _GROUP.value == "channel" else (32 if _SMALL.value else int(_GROUP.value))
  x, w, h = make_layer(k, n, tokens)
  opts = dict(group_size=group, act_order=_ACT_ORDER.value, static_groups=_STATIC.value, block_size=_BLOCK.value)
  methods = {
      "rtn": lambda w, h: quant.quantize(w, _FMT.value, axis=0, group_size=group),
      "gptq": lambda w, h: quant.gptq(w, h, _FMT.value, **opts),
  }
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, commit {_commit()}")
  print(f"layer {k} x {n}, {tokens} tokens, {_FMT.value} group {group}, {opts}")
  print("| method | ms | rel. recon. error |")
  print("|---|---|---|")
  rows = []
  for name, fn in methods.items():
    ms = median_ms(fn, (w, h), _REPEATS.value)
    err = rel_error(x, w, fn(w, h))
    rows.append({"method": name, "ms": ms, "rel_err": err})
    print(f"| {name} | {ms:.1f} | {err:.4e} |", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"device": dev.device_kind, "jax": jax.__version__, "commit": _commit(), "k": k, "n": n,
                 "tokens": tokens, "fmt": _FMT.value, "group": group, **opts, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
