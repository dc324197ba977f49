"""Learning-rate schedules and the optimizer's weight-decay mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cce_jax.training import optim


def test_cosine_schedule():
  lr = optim.learning_rate(optim.OptimConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1))
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(55), lr(100)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)


def test_wsd_schedule():
  lr = optim.learning_rate(optim.OptimConfig(steps=100, lr=2.0, warmup_steps=10, schedule="wsd",
                                             decay_fraction=0.2, min_lr_ratio=0.0))
  np.testing.assert_allclose([lr(5), lr(10), lr(50), lr(80), lr(90), lr(100)], [1.0, 2.0, 2.0, 2.0, 1.0, 0.0],
                             atol=1e-6)


def test_unknown_schedule():
  with pytest.raises(ValueError, match="unknown schedule"):
    optim.learning_rate(optim.OptimConfig(steps=10, schedule="linear"))


def test_weight_decay_only_on_matrices():
  cfg = optim.OptimConfig(steps=10, lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0.0)
  tx = optim.make_optimizer(cfg)
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  grads = {"w": jnp.zeros((2, 2)), "scale": jnp.zeros((2,))}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # Zero gradients: Adam moves nothing, decoupled decay takes lr · weight_decay · w = 0.1 · 0.5 · 1.
  np.testing.assert_allclose(np.asarray(new["w"]), 0.95, rtol=1e-6)  # decayed by exactly lr · wd
  np.testing.assert_array_equal(new["scale"], params["scale"])  # not decayed
