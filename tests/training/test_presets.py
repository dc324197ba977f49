"""Every preset in experiments/configs builds a valid model config and optimizer."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from cce_jax import models
from cce_jax.training import optim
from cce_jax.training import trainer
from cce_jax.training.config import base_config

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
  trainer.loss_options(cfg)


@pytest.mark.parametrize("mode,options", [("full", {"filter_eps": None}), ("exact", {"exact": True}),
                                          ("filtered", {})])
def test_loss_gradient_modes(mode, options):
  cfg = base_config()
  assert cfg.loss_gradient == "full"
  cfg.loss_gradient = mode
  assert trainer.loss_options(cfg) == options
  del cfg["loss_gradient"]  # a config saved before the field existed
  assert trainer.loss_options(cfg) == {}


def test_bad_loss_gradient():
  cfg = base_config()
  cfg.loss_gradient = "sparse"
  with pytest.raises(ValueError, match="loss_gradient"):
    trainer.loss_options(cfg)
