"""A cheap per-row estimate of the LSE, a little below it, from a sample of the vocabulary (XLA).

The low-memory filtered mode codes each row's largest logit per vocabulary tile relative to a per-row reference
(`mosaic_forward.CODE_LEVELS`); its keep mask is tight where the reference is close to the row's LSE, which the
forward only learns at its end. This estimate is that reference:

  ref = log(exp(s_target) + exp(s_top) + (V - 2) / m * sum over the other samples of exp(s) * exp(-z * se)),

over `samples` vocabulary columns spread evenly (a stride) with the target's column left out: the target's
logit is exact, the largest sampled logit counts once (one large logit in the sample is not scaled up to V of
them), and the rest stand in for the V - 2 columns not sampled, less z standard errors of their mean (relative
se), so that the estimate lands at or a little below the LSE. It need not bound the LSE: the keep rule takes
lse - ref from the forward, and only tightness depends on it. Rows whose target is out of range get +inf (no
tile of theirs is needed). The sample logits go through the same softcap / temperature transform as the
loss's.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy.config import pow2_floor

# Sample columns and rows per step such that the gathered [samples, D] classifier rows and one step's [rows, D]
# hidden rows stay within 4 MiB each (bf16), and the [rows, samples] fp32 logits within 4 MiB. 512 samples at
# D = 4096 put the estimate's standard error near 0.05 nats on near-uniform softmaxes.
_ELEMENTS = 1 << 21
MAX_SAMPLES = 1024
Z = 3.0


def sizes(n: int, v: int, d: int) -> tuple[int, int]:
  """(samples, rows per step) for an [n, d] x [v, d] problem."""
  samples = max(1, min(MAX_SAMPLES, v, pow2_floor(_ELEMENTS // max(d, 1))))
  rows = max(8, min(pow2_floor(_ELEMENTS // max(d, 1)), pow2_floor(_ELEMENTS // 2 // samples)))
  return samples, min(rows, max(8, pow2_floor(n)))


def target_logits(stats, e_NxD, c_VxD, bias_V, targets_N):
  """[N] fp32 transformed target logits and the in-range mask."""
  v = c_VxD.shape[0]
  ok = (targets_N >= 0) & (targets_N < v)
  t = jnp.where(ok, targets_N, 0)
  z = jnp.sum(e_NxD.astype(jnp.float32) * c_VxD[t].astype(jnp.float32), axis=1)
  if bias_V is not None:
    z = z + bias_V[t].astype(jnp.float32)
  return base.transform(z, stats)[0], ok


def reference(stats, e_NxD, c_VxD, bias_V, targets_N, *, samples=None, z=Z):
  """[N] fp32: the estimate above (+inf for out-of-range targets). stats: a `base.StatsSpec` (its softcap and
  inv_temperature are used)."""
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  s_target, ok = target_logits(stats, e_NxD, c_VxD, bias_V, targets_N)
  k, rows = sizes(n, v, d)
  if samples is not None:
    k = max(1, min(int(samples), v))
  stride = v // k
  cols = jnp.arange(k, dtype=jnp.int32) * stride + stride // 2
  compute = jnp.result_type(e_NxD.dtype, c_VxD.dtype)
  c_sub = c_VxD[cols].astype(compute)
  b_sub = None if bias_V is None else bias_V[cols].astype(jnp.float32)
  steps = -(-n // rows)
  pad = steps * rows - n
  e_pad = jnp.pad(e_NxD.astype(compute), ((0, pad), (0, 0))).reshape(steps, rows, d)
  t_pad = jnp.pad(targets_N.astype(jnp.int32), (0, pad)).reshape(steps, rows)

  def noise(args):
    e_blk, t_blk = args
    z_blk = lax.dot_general(e_blk, c_sub, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if b_sub is not None:
      z_blk = z_blk + b_sub[None, :]
    s = base.transform(z_blk, stats)[0]
    live = cols[None, :] != t_blk[:, None]
    s = jnp.where(live, s, -jnp.inf)
    top = jnp.max(s, axis=1)
    safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.where(live, jnp.exp(s - safe_top[:, None]), 0.0)
    m = jnp.sum(live, axis=1).astype(jnp.float32) - 1.0  # samples other than the top one
    rest = jnp.maximum(jnp.sum(w, axis=1) - 1.0, 0.0)
    per = jnp.maximum(m, 1.0)
    mean = rest / per
    var = jnp.maximum((jnp.sum(w * w, axis=1) - 1.0) / per - mean * mean, 0.0)
    se = jnp.where(mean > 0, jnp.sqrt(var / per) / jnp.where(mean > 0, mean, 1.0), 0.0)
    scaled = rest * ((v - 2) / per) * jnp.exp(-z * se)
    return jnp.where(jnp.isfinite(top), top + jnp.log1p(scaled), -jnp.inf)

  s_noise = lax.map(noise, (e_pad, t_pad)).reshape(-1)[:n]
  return jnp.where(ok, jnp.logaddexp(s_target, s_noise), jnp.inf)
