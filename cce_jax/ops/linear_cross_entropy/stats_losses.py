"""The losses of this op as plain formulas over the per-token logit statistics of `base.LogitStats` (shared by
the blockwise backends), and the statistics' merge over a vocabulary split."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from cce_jax.ops.linear_cross_entropy.base import LogitStats


def cross_entropy(stats: LogitStats, valid_N, *, vocab_size: int, label_smoothing: float, z_loss: float):
  """Per-token loss [N] (0 where not valid_N) and LSE [N].

  loss = (1 - α)(lse - s_t) + α(lse - mean_v s_v) + z·lse², the cross-entropy against the smoothed target
  (1 - α)·onehot(t) + α/V (as optax and PyTorch define label smoothing) plus the z-loss.
  """
  lse = stats.lse
  loss = (1.0 - label_smoothing) * (lse - stats.target_logit)
  if label_smoothing:
    loss = loss + label_smoothing * (lse - stats.sum_logits / vocab_size)
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  return jnp.where(valid_N, loss, 0.0), lse


def logprobs(stats: LogitStats):
  """log p(target) [N] and entropy [N]: s_t - lse and lse - E_p[s]."""
  return stats.target_logit - stats.lse, stats.lse - stats.mean_logit


def merge_vocab_shards(stats: LogitStats, *, axes) -> LogitStats:
  """The statistics over the whole vocabulary from each device's over its rows of a vocabulary split over the
  mesh axes `axes` (inside shard_map; differentiable: each shard's LSE gets its softmax share of the cotangent).

  lse = log Σ_k exp(lse_k); the target logit and the logit sum add up (a target outside a shard's rows gives 0
  there); the mean logit is Σ_k exp(lse_k - lse) mean_k.
  """
  ref = lax.pmax(lax.stop_gradient(stats.lse), axes)  # a shift for exp, out of the gradient
  ref = jnp.where(jnp.isfinite(ref), ref, 0.0)
  weight = jnp.exp(stats.lse - ref)
  total = lax.psum(weight, axes)
  lse = ref + jnp.log(total)
  return LogitStats(lse, lax.psum(stats.target_logit, axes), lax.psum(stats.sum_logits, axes),
                    lax.psum(weight / total * stats.mean_logit, axes))
