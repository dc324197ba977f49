"""The training config: every field with its default (docs/training.md describes each); presets in
experiments/configs/ override some. `model_config` turns it into the model's own config."""

import ml_collections

from cce_jax import models
from cce_jax.training.loss_keywords import DEFAULT_LOSS_GRADIENT


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Data: "stdlib" (this Python's standard-library sources, no download), a glob of text files or "hf:NAME".
  c.data = "stdlib"
  c.data_cache = "~/.cache/cce_jax/data"
  c.max_bytes = 0  # 0: the whole corpus
  c.val_fraction = 0.05
  c.vocab_size = 8192
  c.seq_len = 256
  c.batch_size = 32
  c.steps = 1000
  c.model = ml_collections.ConfigDict(dict(D=256, H=4, KV=4, L=4, F=768, dtype="bfloat16", tie_embeddings=False,
                                           remat=False))
  c.optim = ml_collections.ConfigDict(dict(lr=3e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1,
                                           decay_fraction=0.2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                           grad_clip=1.0))
  # "auto" (fused: Pallas on NVIDIA GPUs, blockwise XLA elsewhere), "xla_chunked", "pallas_gpu", "xla_fused"
  # (gradient formed in the forward pass over row blocks of logits; no filtering) or "naive".
  c.loss = "auto"
  # Gradient of the fused loss: "full", "exact" or "filtered" (loss_keywords.py; docs/training.md).
  c.loss_gradient = DEFAULT_LOSS_GRADIENT
  c.fsdp = False
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.eval_every = 200
  c.eval_batches = 8
  c.log_every_s = 10.0
  c.plot = True
  return c


def model_config(cfg) -> models.Config:
  """The decoder's config from a training config (V = vocab_size, T = seq_len)."""
  m = cfg.model
  return models.Config(V=cfg.vocab_size, D=m.D, H=m.H, KV=m.KV, L=m.L, F=m.F, T=cfg.seq_len, dtype=m.dtype,
                       tie_embeddings=m.tie_embeddings, remat=m.remat)
