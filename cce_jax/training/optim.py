"""AdamW with warmup + cosine or warmup-stable-decay schedules and gradient clipping (optax)."""

from __future__ import annotations

import optax

SCHEDULES = ("cosine", "wsd")


def learning_rate(cfg) -> optax.Schedule:
  """cfg: lr, warmup_steps, steps, schedule ("cosine" | "wsd"), min_lr_ratio, decay_fraction (wsd)."""
  warmup = max(0, min(cfg.warmup_steps, cfg.steps))
  floor = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 1), max(cfg.steps, warmup + 1), floor)
  if cfg.schedule == "wsd":
    decay = max(1, int(cfg.steps * cfg.decay_fraction))
    stable = max(0, cfg.steps - warmup - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, floor, decay)],
        boundaries=[max(warmup, 1), max(warmup, 1) + stable])
  raise ValueError(f"unknown schedule {cfg.schedule!r}; choose from {SCHEDULES}")


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW; weight decay on matrices only (not on norm scales)."""
  decay_mask = lambda params: {k: v.ndim >= 2 for k, v in params.items()}
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
      optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask))
