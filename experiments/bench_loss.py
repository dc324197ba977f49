r"""Benchmark of the fused loss against the materialised one, following the protocol in BENCHMARK.md.

  python experiments/bench_loss.py --shapes=gemma2_2b,llama3_8b_4k --regimes=random,peaked --out=/tmp/bench

Every method runs in this one process on the same inputs: median time of the forward and of loss + gradient
(>= 20 timed runs after a warm-up, blocking on the results), effective TFLOP/s, the temporary memory of the
compiled loss + gradient program, and the relative L2 error of loss, dE and dC against the fp32 reference
(upcast inputs, HIGHEST precision). Prints a markdown table last and writes JSON to --out.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import cce_jax

SHAPES = {  # name: (N, D, V, softcap)
    "gemma2_2b": (8192, 2304, 256000, 30.0),
    "llama3_8b_4k": (4096, 4096, 128256, None),
    "llama3_8b_8k": (8192, 4096, 128256, None),
    "qwen_small": (16384, 1024, 151936, None),
    "tiny": (256, 128, 1000, 30.0),
}

METHODS = ("naive", "xla_chunked", "pallas_gpu", "pallas_gpu_exact")

_SHAPES = flags.DEFINE_list("shapes", ["gemma2_2b"], f"Shapes from {sorted(SHAPES)}.")
_REGIMES = flags.DEFINE_list("regimes", ["random", "peaked"], "Input regimes: random, peaked.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Methods from {METHODS}.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs per measurement.")
_ACCURACY = flags.DEFINE_bool("accuracy", True, "Compare against the fp32 reference (needs N×V fp32 memory).")
_OUT = flags.DEFINE_string("out", None, "Folder for results.json.")


def make_inputs(n, d, v, dtype, regime, seed=0):
  """random: e ~ N(0, 1), c ~ N(0, 1/D), near-uniform softmax. peaked: e pulled towards its target's row."""
  ks = jax.random.split(jax.random.key(seed), 3)
  c = jax.random.normal(ks[0], (v, d), jnp.float32) / np.sqrt(d)
  targets = jax.random.randint(ks[1], (n,), 0, v)
  e = jax.random.normal(ks[2], (n, d), jnp.float32)
  if regime == "peaked":
    # Target logit ~14 above noise of unit scale: softmax mass mostly on the target, entropy of a few nats.
    e = e + 14.0 * c[targets] * np.sqrt(d) / jnp.linalg.norm(c[targets] * np.sqrt(d), axis=1, keepdims=True)
  elif regime != "random":
    raise ValueError(f"unknown regime {regime!r}")
  return e.astype(dtype), c.astype(dtype), targets


def naive_loss(e, c, targets, softcap):
  """Materialised logits in the input dtype, then a fp32 log-softmax: what one writes by hand."""
  logits = (e @ c.T).astype(jnp.float32)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return jnp.mean(lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0])


def loss_fn(method, softcap):
  if method == "naive":
    return lambda e, c, t: naive_loss(e, c, t, softcap)
  kw = {"reference": dict(implementation="reference"), "xla_chunked": dict(implementation="xla_chunked"),
        "pallas_gpu": dict(implementation="pallas_gpu"),
        "pallas_gpu_exact": dict(implementation="pallas_gpu", exact=True)}[method]
  return lambda e, c, t: cce_jax.linear_cross_entropy(e, c, t, softcap=softcap, **kw)


def median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def rel_err(x, ref):
  x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def run_one(shape_name, regime, methods, dtype, repeats, accuracy):
  n, d, v, softcap = SHAPES[shape_name]
  e, c, targets = make_inputs(n, d, v, dtype, regime)
  gemm_tflop = 2 * n * d * v / 1e12
  ref = None
  if accuracy:
    ref_fn = jax.jit(jax.value_and_grad(loss_fn("reference", softcap), argnums=(0, 1)))
    ref_loss, (ref_de, ref_dc) = ref_fn(e.astype(jnp.float32), c.astype(jnp.float32), targets)
    ref = (ref_loss, ref_de, ref_dc)
    del ref_fn
  rows = []
  for method in methods:
    f = loss_fn(method, softcap)
    fwd = jax.jit(f)
    both = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    row = dict(shape=shape_name, regime=regime, method=method, n=n, d=d, v=v, softcap=softcap)
    try:
      temp = both.lower(e, c, targets).compile().memory_analysis().temp_size_in_bytes
      row["fwd_ms"] = median_ms(fwd, (e, c, targets), repeats)
      row["fwd_bwd_ms"] = median_ms(both, (e, c, targets), repeats)
      row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
      row["fwd_tflops"] = gemm_tflop / row["fwd_ms"] * 1e3
      row["fwd_bwd_tflops"] = 3 * gemm_tflop / row["fwd_bwd_ms"] * 1e3
      row["temp_mib"] = temp / 2**20
      if ref is not None:
        loss, (de, dc) = both(e, c, targets)
        row.update(err_loss=rel_err(loss, ref[0]), err_de=rel_err(de, ref[1]), err_dc=rel_err(dc, ref[2]))
    except Exception as err:  # pylint: disable=broad-except
      row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


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


def _commit():
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv):
  del argv
  for m in _METHODS.value:
    if m not in METHODS:
      raise app.UsageError(f"unknown method {m!r}; choose from {METHODS}")
  dtype = jnp.dtype(_DTYPE.value)
  device = jax.devices()[0].device_kind
  header = f"{device}, jax {jax.__version__}, commit {_commit()}, dtype {dtype.name}"
  print(header, flush=True)
  rows = []
  for shape_name in _SHAPES.value:
    for regime in _REGIMES.value:
      rows += run_one(shape_name, regime, _METHODS.value, dtype, _REPEATS.value, _ACCURACY.value)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
      json.dump(dict(device=device, jax=jax.__version__, commit=_commit(), dtype=dtype.name, rows=rows), f,
                indent=2)
  print()
  print(header)
  print(table(rows))


if __name__ == "__main__":
  app.run(main)
