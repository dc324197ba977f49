"""The training config's `loss` and `loss_gradient` as keyword arguments of `models.lm_loss` (one place for both).

loss: "auto", "pallas_gpu", "xla_chunked", "xla_fused", "reference" (the fused loss) or "naive" (materialised
logits). loss_gradient, the fused loss's backward: "full" (every logit tile; the default), "exact" (the same at
HIGHEST precision, deterministic) or "filtered" (tiles whose softmax stays below 2^-12 skip their gradient GEMMs:
faster, but it drops the small-probability mass; docs/training.md).
"""

from __future__ import annotations

from cce_jax import models

LOSS_GRADIENTS = {"full": {"filter_eps": None}, "exact": {"exact": True}, "filtered": {"filter_eps": "auto"}}
DEFAULT_LOSS_GRADIENT = "full"


def lm_loss_keywords(loss: str, loss_gradient: str) -> dict:
  """{"implementation", "filter_eps" or "exact"} for `models.lm_loss`; ValueError naming the field for an unknown
  value ("naive" ignores the gradient mode)."""
  if loss not in models.LOSS_IMPLEMENTATIONS:
    raise ValueError(f"config.loss must be one of {models.LOSS_IMPLEMENTATIONS}, got {loss!r}")
  if loss_gradient not in LOSS_GRADIENTS:
    raise ValueError(f"config.loss_gradient must be one of {tuple(LOSS_GRADIENTS)}, got {loss_gradient!r}")
  return {"implementation": loss, **LOSS_GRADIENTS[loss_gradient]}
