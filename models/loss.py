"""The LM loss: mean next-token cross-entropy of a decoder, through the fused loss or materialised logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import cce_jax

LOSS_IMPLEMENTATIONS = ("auto", "pallas_gpu", "xla_chunked", "xla_fused", "reference", "naive")


def lm_loss(model, inputs_BxT, targets_BxT, *, implementation="auto", ignore_index=-100, filter_eps=None,
            exact=False, mesh=None, batch_axes="data"):
  """Mean cross-entropy (fp32) over the targets that are not `ignore_index`, and the token count.

  implementation: "naive" materialises the [B, T, V] logits (fp32 log-softmax) as a hand-written baseline would;
  every other value is passed to `cce_jax.linear_cross_entropy` ("auto": Pallas on NVIDIA GPUs, else blockwise
  XLA). filter_eps and exact are the fused loss's gradient-filtering and exact-mode switches (ignored by
  "naive"). With a `mesh` of more than one device the fused loss runs split over its `batch_axes`
  (`cce_jax.sharded`): under jit XLA would otherwise run the Pallas kernels on the whole batch on every device.
  """
  if implementation not in LOSS_IMPLEMENTATIONS:
    raise ValueError(f"unknown loss implementation {implementation!r}; choose from {LOSS_IMPLEMENTATIONS}")
  hidden_BxTxD = model(inputs_BxT)
  c_VxD = model.classifier()
  valid_BxT = targets_BxT != ignore_index
  count = jnp.sum(valid_BxT)
  if implementation == "naive":
    logits_BxTxV = (hidden_BxTxD @ c_VxD.T).astype(jnp.float32)
    logp_BxTxV = logits_BxTxV - jax.nn.logsumexp(logits_BxTxV, axis=-1, keepdims=True)
    safe_BxT = jnp.where(valid_BxT, targets_BxT, 0)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, safe_BxT[..., None], axis=-1)[..., 0]
    loss = jnp.sum(jnp.where(valid_BxT, nll_BxT, 0.0)) / jnp.maximum(count, 1)
  else:
    options = dict(ignore_index=ignore_index, implementation=implementation, filter_eps=filter_eps, exact=exact)
    if mesh is not None and mesh.size > 1:
      loss = cce_jax.sharded.linear_cross_entropy(hidden_BxTxD, c_VxD, targets_BxT, mesh=mesh,
                                                  batch_axes=batch_axes, **options)
    else:
      loss = cce_jax.linear_cross_entropy(hidden_BxTxD, c_VxD, targets_BxT, **options)
  return loss, count

