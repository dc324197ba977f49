"""The "xla_chunked" backend: the per-token logit statistics of `base` blockwise in plain XLA (every platform).

The loss never materialises the N×V logits. The forward walks [block_n, block_v] tiles of the transformed logits
(`XlaChunkedConfig`; two nested scans, vocabulary blocks outside) with an online log-sum-exp and returns the
per-token statistics of `base.LogitStats`; the losses are formulas over them (`stats_losses`). The hand-written
backward (`xla_backward`) recomputes each tile, with gradient filtering per tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy import xla_backward
from cce_jax.ops.linear_cross_entropy.base import LogitStats
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig


def cross_entropy_per_token(e_NxD, c_VxD, bias_V, targets_N, valid_N, *, softcap, label_smoothing, z_loss,
                            filter_eps, exact, config, combine=None, vocab_size=None):
  """Per-token loss [N] (0 where not valid_N) and LSE [N], fp32, without the N×V logits. combine: applied to the
  statistics before the loss (a vocabulary split's merge), with the split's `vocab_size`."""
  spec = base.StatsSpec(softcap=softcap, inv_temperature=1.0, with_sum=bool(label_smoothing), with_mean=False,
                        exact=exact, filter_eps=filter_eps)
  stats = logit_stats(e_NxD, c_VxD, bias_V, targets_N, spec, config)
  stats = stats if combine is None else combine(stats)
  return stats_losses.cross_entropy(stats, valid_N, vocab_size=vocab_size or c_VxD.shape[0],
                                    label_smoothing=label_smoothing, z_loss=z_loss)


def logprobs_per_token(e_NxD, c_VxD, bias_V, targets_N, *, softcap, temperature, exact, config, combine=None):
  """log p(target) [N] and entropy [N] of softmax(logits / temperature), fp32, without the N×V logits."""
  spec = base.StatsSpec(softcap=softcap, inv_temperature=1.0 / temperature, with_sum=False, with_mean=True,
                        exact=exact, filter_eps=None)
  stats = logit_stats(e_NxD, c_VxD, bias_V, targets_N, spec, config)
  return stats_losses.logprobs(stats if combine is None else combine(stats))


def logit_stats(e_NxD, c_VxD, bias_V, targets_N, spec: base.StatsSpec, config: XlaChunkedConfig) -> LogitStats:
  """Per-token LSE, target logit, logit sum and softmax-mean logit without the N×V logits.

  Args:
    e_NxD: [N, D] hidden states (bf16, f16, f32 or f64).
    c_VxD: [V, D] classifier.
    bias_V: [V] bias or None.
    targets_N: [N] int targets; entries outside [0, V) match no column (their target_logit is 0).
    spec: the math options.
    config: the tiles, already clamped to (N, V).

  Returns:
    LogitStats of [N] arrays in fp32 (f64 for f64 inputs). Fields not requested by the spec are zeros.
  """
  return LogitStats(*_stats(spec, config, e_NxD, c_VxD, bias_V, targets_N))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stats(spec, config, e_NxD, c_VxD, bias_V, targets_N):
  return _stats_fwd(spec, config, e_NxD, c_VxD, bias_V, targets_N)[0]


def _stats_fwd(spec, config, e_NxD, c_VxD, bias_V, targets_N):
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  bn, bv = config.block_n, config.block_v
  acc = base.acc_dtype(e_NxD.dtype, c_VxD.dtype)
  zeros = jnp.zeros((n,), acc)
  # m: running max, l: running sum of exp(s - m), w: running sum of exp(s - m) * s.
  init = manual_axes.vary(dict(m=jnp.full((n,), -jnp.inf, acc), l=zeros, st=zeros, ssum=zeros, w=zeros),
                          manual_axes.axes(e_NxD))

  def v_step(state, j):
    _, c_blk, b_blk, cols, col_new = base.vocab_block(j, bv, c_VxD, bias_V)

    def n_step(state, i):
      n_start, n_first = base.block_start(i, bn, n)
      row_new = (n_start + jnp.arange(bn)) >= n_first
      e_blk = lax.dynamic_slice(e_NxD, (n_start, 0), (bn, d))
      t_blk = lax.dynamic_slice(targets_N, (n_start,), (bn,))
      old = {k: lax.dynamic_slice(x, (n_start,), (bn,)) for k, x in state.items()}
      s, _ = base.transform(base.logit_tile(e_blk, c_blk, b_blk, spec, acc), spec)
      s_masked = jnp.where(col_new[None, :], s, -jnp.inf)
      m_new = jnp.maximum(old["m"], jnp.max(s_masked, axis=1))
      rescale = jnp.exp(old["m"] - m_new)
      p_unnorm = jnp.exp(s_masked - m_new[:, None])
      new = dict(
          m=m_new,
          l=old["l"] * rescale + jnp.sum(p_unnorm, axis=1),
          st=old["st"] + jnp.sum(
              jnp.where((cols[None, :] == t_blk[:, None]) & col_new[None, :], s, 0.0), axis=1),
          ssum=(old["ssum"] + jnp.sum(jnp.where(col_new[None, :], s, 0.0), axis=1)
                if spec.with_sum else old["ssum"]),
          w=(old["w"] * rescale + jnp.sum(p_unnorm * jnp.where(col_new[None, :], s, 0.0), axis=1)
             if spec.with_mean else old["w"]),
      )
      return {
          k: lax.dynamic_update_slice(state[k], jnp.where(row_new, new[k], old[k]), (n_start,))
          for k in state
      }, None

    state, _ = lax.scan(n_step, state, jnp.arange(base.cdiv(n, bn)))
    return state, None

  state, _ = lax.scan(v_step, init, jnp.arange(base.cdiv(v, bv)))
  lse = state["m"] + jnp.log(state["l"])
  mean = state["w"] / state["l"] if spec.with_mean else zeros
  out = (lse, state["st"], state["ssum"], mean)
  return out, (e_NxD, c_VxD, bias_V, targets_N, lse, mean)


_stats.defvjp(_stats_fwd, xla_backward.backward)
