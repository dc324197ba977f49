"""The losses of this op as plain formulas over per-token logit statistics (shared by the blockwise backends)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LogitStats(NamedTuple):
  """Per-token statistics of the transformed logits s; each [N] in the accumulation dtype (fp32 or wider).

  lse = logsumexp_v s_v; target_logit = s_t (0 for t outside [0, V)); sum_logits = sum_v s_v;
  mean_logit = sum_v softmax(s)_v s_v. A backend may leave the last two as zeros when they are not needed.
  """

  lse: jax.Array
  target_logit: jax.Array
  sum_logits: jax.Array
  mean_logit: jax.Array


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
