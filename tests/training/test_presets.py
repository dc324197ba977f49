"""Every preset in experiments/configs validates and builds a model config and optimizer; the loss keywords."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from cce_jax import models
from cce_jax.training import optim
from cce_jax.training import validate
from cce_jax.training.config import base_config
from cce_jax.training.config import model_config
from cce_jax.training.loss_keywords import lm_loss_keywords

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_preset(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  assert "python experiments/train.py --config=experiments/configs/" + path.name in module.__doc__
  validate.validate(cfg)
  assert isinstance(model_config(cfg), models.Config)
  optim.make_optimizer(optim.OptimConfig.from_config(cfg))


@pytest.mark.parametrize("mode,keywords", [("full", {"filter_eps": None}), ("exact", {"exact": True}),
                                           ("filtered", {"filter_eps": "auto"})])
def test_loss_gradient_modes(mode, keywords):
  assert lm_loss_keywords("auto", mode) == {"implementation": "auto", **keywords}


def test_one_default_for_the_loss_gradient():
  """base_config, step.build and bench_train all take it from loss_keywords.DEFAULT_LOSS_GRADIENT."""
  import inspect  # pylint: disable=import-outside-toplevel
  from cce_jax.training import step  # pylint: disable=import-outside-toplevel
  assert base_config().loss_gradient == "full"
  assert inspect.signature(step.build).parameters["loss_gradient"].default == "full"
  bench = (pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench_train.py").read_text()
  assert "gradient or loss_keywords.DEFAULT_LOSS_GRADIENT" in bench and '"filtered"' not in bench


@pytest.mark.parametrize("loss,gradient,match", [("auto", "sparse", "loss_gradient"), ("fast", "full", "loss")])
def test_bad_loss_keywords(loss, gradient, match):
  with pytest.raises(ValueError, match=match):
    lm_loss_keywords(loss, gradient)
