"""The decoder LM: token ids [B, T] -> final hidden states [B, T, D]; the classifier [V, D] for the loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cce_jax.models.config import Config
from cce_jax.models.layers import Block
from cce_jax.models.layers import RMSNorm
from cce_jax.quant import dot
from cce_jax.quant.qarray import QArray


class Decoder(nnx.Module):
  """Llama-style decoder-only transformer whose head returns hidden states, not logits.

  `__call__(tokens_BxT)` gives the final-norm hidden states [B, T, D] in the compute dtype; `classifier()` gives the
  [V, D] matrix c (the embedding when tied), so the loss is `linear_cross_entropy(hidden, classifier(), targets)`
  without the [B, T, V] logits. Parameters are stored in `cfg.param_dtype` (fp32) and cast to `cfg.dtype` for
  compute; a Param may also hold a `QArray` (`cce_jax.quant.quantize_model`), dequantized in the forward.
  """

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.params_dtype
    # Untied: unit-scale embeddings (nanodo); tied: the classifier's scale, so the initial logits stay small.
    embed_std = cfg.init_std if cfg.tie_embeddings else 1.0
    self.embed = nnx.Param(nnx.initializers.normal(stddev=embed_std)(rngs.params(), (cfg.V, cfg.D), pd))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.L)])
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.head = nnx.Param(nnx.initializers.normal(stddev=cfg.init_std)(rngs.params(), (cfg.V, cfg.D), pd))

  def __call__(self, tokens_BxT, positions_BxT=None):
    cfg = self.cfg
    if tokens_BxT.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens_BxT.shape}")
    if tokens_BxT.shape[1] > cfg.T:
      raise ValueError(f"sequence length {tokens_BxT.shape[1]} exceeds Config.T={cfg.T}")
    return self.apply_blocks(self.embed_tokens(tokens_BxT), positions_BxT)

  def embed_tokens(self, tokens_BxT):
    """The input embeddings [B, T, D] in the compute dtype."""
    return jnp.take(dot.read(self.embed), tokens_BxT, axis=0).astype(self.cfg.compute_dtype)

  def apply_blocks(self, x_BxTxD, positions_BxT=None):
    """The transformer blocks and the final norm on input embeddings [B, T, D] (positions default to 0..T-1)."""
    cfg = self.cfg
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(x_BxTxD.shape[1]), x_BxTxD.shape[:2])
    for block in self.blocks:
      if cfg.remat:
        x_BxTxD = nnx.remat(lambda blk, x, p: blk(x, p))(block, x_BxTxD, positions_BxT)
      else:
        x_BxTxD = block(x_BxTxD, positions_BxT)
    return self.final_norm(x_BxTxD)

  def classifier(self):
    """c [V, D] in the compute dtype (the embedding when tied)."""
    return dot.read(self.embed if self.cfg.tie_embeddings else self.head, self.cfg.compute_dtype)


def param_counts(model: Decoder) -> dict[str, int]:
  """{"total": all parameters, "non_embedding": without the embedding and the untied head} (Kaplan's N)."""
  # A QArray counts the elements of the array it stands for, not its codes and scales.
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, QArray))
  total = sum(math.prod(x.shape) for x in leaves)
  cfg = model.cfg
  embedding = cfg.V * cfg.D * (1 if cfg.tie_embeddings else 2)
  return {"total": total, "non_embedding": total - embedding}


def make_model(cfg: Config, seed: int = 0) -> Decoder:
  return Decoder(cfg, rngs=nnx.Rngs(params=seed))
