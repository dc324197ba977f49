"""The oracle: materialised-logits implementations in plain jnp, fp32 (or wider) everywhere.

Written independently of the blockwise code (log_softmax over the full [N, V] logits, gradients by autodiff) so
that tests comparing the two can fail. Memory is O(N·V): use it for tests and small problems only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _logits(e_NxD, c_VxD, bias_V, softcap):
  acc = jnp.promote_types(jnp.float32, jnp.result_type(e_NxD.dtype, c_VxD.dtype))
  logits_NxV = jnp.einsum(
      "nd,vd->nv", e_NxD.astype(acc), c_VxD.astype(acc), precision=jax.lax.Precision.HIGHEST)
  if bias_V is not None:
    logits_NxV = logits_NxV + bias_V.astype(acc)
  if softcap is not None:
    logits_NxV = softcap * jnp.tanh(logits_NxV / softcap)
  return logits_NxV


def _target_logprob(logp_NxV, targets_N):
  """log p[t] per token; 0 for targets outside [0, V) (the API turns those tokens into NaN)."""
  onehot_NxV = targets_N[:, None] == jnp.arange(logp_NxV.shape[1])[None, :]
  return jnp.sum(jnp.where(onehot_NxV, logp_NxV, 0.0), axis=1)


def cross_entropy_per_token(e_NxD, c_VxD, bias_V, targets_N, valid_N, *, softcap, label_smoothing, z_loss,
                            **unused_options):
  """Per-token loss [N] (0 where not valid_N) and LSE [N], both fp32, from the materialised logits."""
  logits_NxV = _logits(e_NxD, c_VxD, bias_V, softcap)
  logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  nll_N = -_target_logprob(logp_NxV, targets_N)
  uniform_N = -jnp.mean(logp_NxV, axis=-1)
  loss_N = (1.0 - label_smoothing) * nll_N + label_smoothing * uniform_N + z_loss * jnp.square(lse_N)
  return jnp.where(valid_N, loss_N, 0.0), lse_N


def logprobs_per_token(e_NxD, c_VxD, bias_V, targets_N, *, softcap, temperature, **unused_options):
  """log p(target) [N] and entropy [N] of softmax(logits / temperature), fp32, materialised."""
  logits_NxV = _logits(e_NxD, c_VxD, bias_V, softcap) / temperature
  logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
  entropy_N = -jnp.sum(jnp.exp(logp_NxV) * logp_NxV, axis=-1)
  return _target_logprob(logp_NxV, targets_N), entropy_N
