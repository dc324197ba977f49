"""The loss benchmark's inputs: the shapes of the CCE paper's Table 1 and friends, three synthetic regimes (random,
peaked, lm_like), and the hidden states of a trained model saved by experiments/dump_hidden.py.

The protocol (shapes, regimes, timing, errors) is the "Protocol" section of BENCHMARKS.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.linear_cross_entropy import lm_like

SHAPES = {  # name: (N, D, V, softcap)
    "gemma2_2b": (8192, 2304, 256000, 30.0),
    "llama3_8b_4k": (4096, 4096, 128256, None),
    "llama3_8b_8k": (8192, 4096, 128256, None),
    "qwen_small": (16384, 1024, 151936, None),
    "tiny": (256, 128, 1000, 30.0),
}


REGIMES = ("random", "peaked", "lm_like")


def make_inputs(n, d, v, dtype, regime, seed=0, *, entropy=None, softcap=None):
  """(e [N, D], c [V, D] in dtype, targets [N] int32). random: e ~ N(0, 1), c ~ N(0, 1/D), near-uniform
  softmax. peaked: e pulled towards its target's row. lm_like: a trained LM's statistics (lm_like.py) with mean
  entropy `entropy` nats (default lm_like.DEFAULT_ENTROPY) under the `softcap` the benchmark applies."""
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}")
  if regime == "lm_like":
    entropy = lm_like.DEFAULT_ENTROPY if entropy is None else entropy
    return lm_like.make_lm_like(n, d, v, dtype, entropy=entropy, softcap=softcap, seed=seed)
  if entropy is not None:
    raise ValueError(f"entropy= applies to the lm_like regime only, not to {regime!r}")
  ks = jax.random.split(jax.random.key(seed), 3)
  c_VxD = jax.random.normal(ks[0], (v, d), jnp.float32) / np.sqrt(d)
  targets_N = jax.random.randint(ks[1], (n,), 0, v)
  e_NxD = jax.random.normal(ks[2], (n, d), jnp.float32)
  if regime == "peaked":
    # Target logit ~14 above noise of unit scale: softmax mass mostly on the target, entropy of a few nats.
    rows_NxD = c_VxD[targets_N] * np.sqrt(d)
    e_NxD = e_NxD + 14.0 * rows_NxD / jnp.linalg.norm(rows_NxD, axis=1, keepdims=True)
  return e_NxD.astype(dtype), c_VxD.astype(dtype), targets_N


def load_lm(path, dtype):
  """(e [N, D], c [V, D], targets [N]) saved by experiments/dump_hidden.py, cast to dtype."""
  with np.load(path) as f:
    return (jnp.asarray(f["e"], dtype), jnp.asarray(f["c"], dtype), jnp.asarray(f["targets"], jnp.int32))
