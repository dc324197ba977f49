"""The math every backend of the op shares: the per-token logit statistics, their spec, the logit transform and
the tile math of the backward.

Every backend computes, per token, four statistics of the transformed logits `s = f(e @ c.T + b)` (f: optional
softcap, then temperature), without the N×V logits:

  lse          = logsumexp_v s_v
  target_logit = s_t                       (0 when t is outside [0, V))
  sum_logits   = sum_v s_v                 (for label smoothing; only when requested)
  mean_logit   = sum_v softmax(s)_v s_v    (for the entropy; only when requested)

and every loss of the op is a plain jnp formula over these four fp32 vectors (`stats_losses`). So one custom_vjp
per backend serves all losses: its backward receives the four per-token cotangents, recomputes each logit tile,
forms

  dS = (g_lse + g_mean * (1 + s - mean_logit)) * softmax(s) + g_target * onehot(t) + g_sum

(`tile_dlogits`) and accumulates dE = dZ @ c and dC = dZ.T @ e (dZ = dS * ds/dz). The only residual beyond the
inputs is the fp32 LSE (and mean_logit when the entropy is asked for).

Gradient filtering (Wijmans et al. 2024, §4.3): with `filter_eps`, a tile whose |dS| / max(|g_lse|, |g_target|,
|g_mean|) is below `filter_eps` everywhere may skip its gradient GEMMs. For the cross-entropy that ratio is
|softmax - onehot|, the paper's criterion.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class StatsSpec:
  """The math options of one statistics computation (hashable: it keys the backends' custom_vjp). Each backend
  keeps its tile config beside it.

  softcap: cap of the optional softcap, or None; inv_temperature: 1 / temperature (applied after the softcap);
  with_sum, with_mean: whether sum_logits and mean_logit are computed; exact: HIGHEST matmul precision, no
  filtering; filter_eps: the gradient filter's threshold, or None.
  """

  softcap: float | None
  inv_temperature: float
  with_sum: bool
  with_mean: bool
  exact: bool
  filter_eps: float | None


class LogitStats(NamedTuple):
  """Per-token statistics of the transformed logits s; each [N] in the accumulation dtype (fp32 or wider).

  lse = logsumexp_v s_v; target_logit = s_t (0 for t outside [0, V)); sum_logits = sum_v s_v;
  mean_logit = sum_v softmax(s)_v s_v. A backend may leave the last two as zeros when they are not needed.
  """

  lse: jax.Array
  target_logit: jax.Array
  sum_logits: jax.Array
  mean_logit: jax.Array


def acc_dtype(*dtypes):
  """fp32, or wider for wider inputs (f64 inputs accumulate in f64, for finite-difference checks)."""
  return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes))


def matmul_precision(spec: StatsSpec):
  """The XLA GEMMs' precision: HIGHEST in exact mode, else XLA's default."""
  return lax.Precision.HIGHEST if spec.exact else None


def transform(z, spec: StatsSpec):
  """s = f(z) and ds/dz for the softcap-then-temperature transform (elementwise, in z's dtype)."""
  if spec.softcap is None:
    return z * spec.inv_temperature, spec.inv_temperature
  t = jnp.tanh(z / spec.softcap)
  return t * (spec.softcap * spec.inv_temperature), spec.inv_temperature * (1.0 - t * t)


def logit_tile(e_blk, c_blk, b_blk, spec: StatsSpec, acc):
  """z = e_blk @ c_blk.T (+ b_blk) with `acc` (fp32 or wider) accumulation: [bn, bv], for e_blk [bn, D],
  c_blk [bv, D], b_blk [bv] or None. The GEMM takes its operands in their promoted dtype."""
  compute = jnp.result_type(e_blk.dtype, c_blk.dtype)
  z = lax.dot_general(
      e_blk.astype(compute), c_blk.astype(compute), (((1,), (1,)), ((), ())),
      preferred_element_type=acc, precision=matmul_precision(spec))
  if b_blk is not None:
    z = z + b_blk.astype(acc)[None, :]
  return z


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def block_start(i, block, size):
  """(start, first): block i of `block` entries starts at `first`; a block that would run past `size` is moved
  back to end at the edge (start < first), and its entries before `first` belong to the previous block."""
  first = i * block
  return jnp.minimum(first, size - block), first


def vocab_block(j, block, c_VxD, bias_V):
  """Block j of `block` classifier rows, moved back at the edge (`block_start`): (v_start, c_blk [block, D],
  b_blk [block] or None, cols [block] their vocabulary indices, col_new [block] bool: not in an earlier block)."""
  v_start, v_first = block_start(j, block, c_VxD.shape[0])
  c_blk = lax.dynamic_slice(c_VxD, (v_start, 0), (block, c_VxD.shape[1]))
  b_blk = None if bias_V is None else lax.dynamic_slice(bias_V, (v_start,), (block,))
  cols = v_start + jnp.arange(block)
  return v_start, c_blk, b_blk, cols, cols >= v_first


def backward_cotangents(spec: StatsSpec, residuals, cotangents):
  """The four per-token cotangents in the accumulation dtype (zeros for statistics the spec did not compute),
  and 1 / max(|g_lse|, |g_target|, |g_mean|) per token: 0 for tokens without cotangent, NaN kept as NaN so that
  a NaN loss reaches the gradients. residuals[4] is the LSE [N]."""
  lse = residuals[4]
  g_lse, g_st, g_sum, g_mean = (g.astype(lse.dtype) for g in cotangents)
  if not spec.with_sum:
    g_sum = jnp.zeros_like(g_sum)
  if not spec.with_mean:
    g_mean = jnp.zeros_like(g_mean)
  row_scale = jnp.maximum(jnp.maximum(jnp.abs(g_lse), jnp.abs(g_st)), jnp.abs(g_mean))
  inv_row_scale = jnp.where(row_scale == 0, 0.0, 1.0 / jnp.where(row_scale == 0, 1.0, row_scale))
  return (g_lse, g_st, g_sum, g_mean), inv_row_scale


def tile_dlogits(s, cols, targets, lse, mean, g_lse, g_st, g_sum, g_mean, spec: StatsSpec):
  """dS = (g_lse + g_mean (1 + s - mean)) softmax(s) + g_target onehot(t) + g_sum for one [bn, bv] logit tile.

  s: [bn, bv] transformed logits; cols: [bv] their vocabulary indices; every other array is a [bn, 1] column.
  Plain jnp, so it lowers inside a Pallas kernel too.
  """
  coef = g_lse
  if spec.with_mean:
    coef = coef + g_mean * (1.0 + s - mean)
  ds = coef * jnp.exp(s - lse) + jnp.where(cols[None, :] == targets, g_st, 0.0)
  if spec.with_sum:
    ds = ds + g_sum
  return ds
