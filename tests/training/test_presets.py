"""Every preset in experiments/configs builds a valid model config and optimizer."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from cce_jax import models
from cce_jax.training import optim
from cce_jax.training import trainer

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_preset(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  assert "python experiments/train.py --config=experiments/configs/" + path.name in module.__doc__
  mcfg = trainer.model_config(cfg)
  assert isinstance(mcfg, models.Config)
  optim.make_optimizer(optim.OptimConfig.from_config(cfg))
  assert cfg.loss in models.LOSS_IMPLEMENTATIONS
