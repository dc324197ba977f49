"""Inputs, methods and measurements shared by the loss benchmarks (experiments/bench_loss.py and friends).

Follows the protocol in BENCHMARK.md: the shapes of the CCE paper's Table 1 and friends, two input regimes,
median device time with blocking, relative L2 errors against the fp32 reference.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.ops.linear_cross_entropy.api import linear_cross_entropy
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig

SHAPES = {  # name: (N, D, V, softcap)
    "gemma2_2b": (8192, 2304, 256000, 30.0),
    "llama3_8b_4k": (4096, 4096, 128256, None),
    "llama3_8b_8k": (8192, 4096, 128256, None),
    "qwen_small": (16384, 1024, 151936, None),
    "tiny": (256, 128, 1000, 30.0),
}


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


def load_lm(path, dtype):
  """(e [N, D], c [V, D], targets [N]) saved by experiments/dump_hidden.py, cast to dtype."""
  with np.load(path) as f:
    return (jnp.asarray(f["e"], dtype), jnp.asarray(f["c"], dtype), jnp.asarray(f["targets"], jnp.int32))


def naive_loss(e, c, targets, softcap):
  """Materialised logits in the input dtype, then a fp32 log-softmax: what one writes by hand."""
  logits = (e @ c.T).astype(jnp.float32)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return jnp.mean(lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0])


# The default filtered config with one change: "lowmem" the backward in ~10-13 MiB of temporaries (low_memory),
# "sparse" always through the tile-skipping kernels (no dense fallback), "sorted" with the vocabulary sorted by
# mean logit first, "triton" with the Triton forward where Mosaic GPU's would run.
_FILTERED_VARIANTS = {
    "pallas_gpu_lowmem": dict(low_memory=True),
    "pallas_gpu_sparse": dict(dense_backward_above=1.0),
    "pallas_gpu_sorted": dict(sort_vocabulary=True),
    "pallas_gpu_triton": dict(forward_kernel="triton"),
}


def loss_fn(method, softcap):
  if method == "naive":
    return lambda e, c, t: naive_loss(e, c, t, softcap)
  if method in _FILTERED_VARIANTS:
    def variant(e, c, t):
      cfg = PallasGpuConfig.for_shape(e.shape[0], c.shape[0], c.shape[1], softcap=softcap, filtered=True)
      cfg = dataclasses.replace(cfg, **_FILTERED_VARIANTS[method])
      return linear_cross_entropy(e, c, t, softcap=softcap, implementation="pallas_gpu", config=cfg)
    return variant
  kw = {"reference": dict(implementation="reference"), "xla_chunked": dict(implementation="xla_chunked"),
        "xla_fused": dict(implementation="xla_fused"), "xla_fused_exact": dict(implementation="xla_fused", exact=True),
        "pallas_gpu": dict(implementation="pallas_gpu"),
        "pallas_gpu_full": dict(implementation="pallas_gpu", filter_eps=None),
        "pallas_gpu_exact": dict(implementation="pallas_gpu", exact=True)}[method]
  return lambda e, c, t: linear_cross_entropy(e, c, t, softcap=softcap, **kw)


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
