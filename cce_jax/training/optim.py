"""AdamW with warmup + cosine or warmup-stable-decay schedules and gradient clipping (optax)."""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("cosine", "wsd")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW and schedule settings (defaults as in the training config's `optim` block)."""

  steps: int
  lr: float = 3e-3
  warmup_steps: int = 100
  schedule: str = "cosine"
  min_lr_ratio: float = 0.1
  decay_fraction: float = 0.2
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0

  @classmethod
  def from_config(cls, cfg) -> "OptimConfig":
    """From a training config (its `steps` and `optim` block)."""
    return cls(steps=cfg.steps, **{f.name: cfg.optim[f.name] for f in dataclasses.fields(cls) if f.name != "steps"})


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup, then cosine decay to min_lr_ratio · lr, or (wsd) constant then a linear decay over the last
  decay_fraction of the steps."""
  warmup = max(0, min(cfg.warmup_steps, cfg.steps))
  floor = cfg.lr * cfg.min_lr_ratio
  pieces, boundaries = [], []
  if warmup:
    pieces.append(optax.linear_schedule(0.0, cfg.lr, warmup))
    boundaries.append(warmup)
  if cfg.schedule == "cosine":
    pieces.append(optax.cosine_decay_schedule(cfg.lr, max(cfg.steps - warmup, 1), alpha=cfg.min_lr_ratio))
  elif cfg.schedule == "wsd":
    decay = min(max(1, int(cfg.steps * cfg.decay_fraction)), max(cfg.steps - warmup, 1))
    pieces += [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, floor, decay)]
    boundaries.append(max(cfg.steps - decay, warmup))
  if cfg.schedule in SCHEDULES:
    return optax.join_schedules(pieces, boundaries) if boundaries else pieces[0]
  raise ValueError(f"unknown schedule {cfg.schedule!r}; choose from {SCHEDULES}")


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW; weight decay on matrices only (not on norm scales)."""
  decay_mask = lambda params: {k: v.ndim >= 2 for k, v in params.items()}
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
      optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask))
