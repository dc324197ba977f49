"""validate(config) and the --config.NAME check: one-line errors before anything runs; every field documented."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

from cce_jax.training import validate
from cce_jax.training.config import base_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(**changes):
  cfg = base_config()
  for name, value in changes.items():
    group, _, field = name.rpartition("__")
    (cfg[group] if group else cfg)[field] = value
  return cfg


def test_the_base_config_is_valid():
  validate.validate(base_config())


@pytest.mark.parametrize("changes,message", [
    (dict(optim__lr=-1e-3), "optim.lr=-0.001 must be > 0"),
    (dict(optim__lr=float("nan")), "optim.lr=nan must be > 0"),
    (dict(steps=0), "steps=0 must be >= 1"),
    (dict(batch_size=-2), "batch_size=-2 must be >= 1"),
    (dict(seq_len=0), "seq_len=0 must be >= 1"),
    (dict(optim__warmup_steps=2000), "optim.warmup_steps=2000 must be <= steps=1000"),
    (dict(val_fraction=1.0), r"val_fraction=1.0 must be in \[0, 1\)"),
    (dict(vocab_size=100), "vocab_size=100 must be >= 258"),
    (dict(optim__b2=1.0), r"optim.b2=1.0 must be in \[0, 1\)"),
    (dict(optim__schedule="linear"), "optim.schedule='linear' must be one of"),
    (dict(loss_gradient="sparse"), "loss_gradient must be one of"),
    (dict(keep_checkpoints=0), "keep_checkpoints=0 must be >= 1"),
    (dict(model__D=30), "model: .*multiple of H"),
    (dict(data=""), "data='' must name a corpus"),
])
def test_nonsense_values_are_one_line_errors(changes, message):
  with pytest.raises(validate.ConfigError, match=message) as info:
    validate.validate(_config(**changes))
  assert "\n" not in str(info.value)


def test_every_problem_is_named_at_once():
  with pytest.raises(validate.ConfigError) as info:
    validate.validate(_config(optim__lr=-1.0, steps=0, loss="fast"))
  assert all(s in str(info.value) for s in ("optim.lr=", "steps=0", "'fast'"))


def test_unknown_and_missing_fields():
  cfg = base_config()
  cfg.stepz = 10  # a typo in a preset
  with pytest.raises(validate.ConfigError, match="unknown config field 'stepz'; did you mean 'steps'"):
    validate.validate(cfg)
  cfg = base_config()
  del cfg.optim["lr"]
  with pytest.raises(validate.ConfigError, match="missing config field.*optim.lr"):
    validate.validate(cfg)


@pytest.mark.parametrize("name,suggestion", [("nonexistent", "docs/training.md lists the fields"),
                                             ("optim.lrr", "did you mean 'optim.lr'?"),
                                             ("lr", "did you mean 'optim.lr'?"),
                                             ("batchsize", "did you mean 'batch_size'?"),
                                             ("model.d", "did you mean 'model.D'?")])
def test_override_names_are_checked_with_the_closest_fields(name, suggestion):
  with pytest.raises(validate.ConfigError) as info:
    validate.check_override_names(["steps", name])
  assert str(info.value) == f"unknown config field {name!r}; {suggestion}"
  validate.check_override_names(["optim.lr", "model", "model.remat"])  # fields and groups pass


def test_every_field_is_documented_and_the_script_points_there():
  doc = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
  documented = set(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", doc, flags=re.M))
  cfg = base_config()
  fields = validate.field_names(cfg)
  assert {name for name, _ in documented} == set(fields)
  for name, default in documented:  # the documented default is the code's
    value = cfg
    for part in name.split("."):
      value = value[part]
    assert ast.literal_eval(default) == value, name
  script = (ROOT / "experiments" / "train.py").read_text(encoding="utf-8")
  assert script.count("docs/training.md") >= 2  # the module docstring (--help prints it) and the --config help
