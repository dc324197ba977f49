"""Checks of a training config before anything runs: every field known and present, every value usable.

`validate(cfg)` raises ConfigError, one line naming each problem; `check_override_names(names)` does the same for
the NAMEs of --config.NAME=VALUE flags, before ml_collections parses them (its own error is a chained traceback),
with the closest valid names. docs/training.md lists the fields.
"""

from __future__ import annotations

import difflib
import math

from cce_jax.training import config as config_lib
from cce_jax.training import optim
from cce_jax.training.loss_keywords import lm_loss_keywords


class ConfigError(ValueError):
  """A training config (or a --config.NAME flag) that cannot work; the message names the field and the fix."""


def field_names(cfg) -> list[str]:
  """The dotted names of the config's leaves ("steps", "optim.lr", ...), sorted."""
  names = []
  for key, value in cfg.items():
    if hasattr(value, "items"):
      names += [f"{key}.{sub}" for sub in field_names(value)]
    else:
      names.append(key)
  return sorted(names)


def _known_names() -> list[str]:
  """The leaves and the groups ("model", "optim") of the base config."""
  leaves = field_names(config_lib.base_config())
  return sorted(set(leaves) | {n.rsplit(".", 1)[0] for n in leaves if "." in n})


def unknown_field_message(name: str) -> str:
  """"unknown config field 'X'; did you mean 'Y', 'Z'?": fields whose last part is close to X's (or holds it)."""
  last = name.rsplit(".", 1)[-1].lower()
  scored = []
  for field in field_names(config_lib.base_config()):
    other = field.rsplit(".", 1)[-1].lower()
    score = difflib.SequenceMatcher(None, last, other).ratio()
    if score >= 0.75 or (min(len(last), len(other)) >= 3 and (last in other or other in last)):
      scored.append((-score, field))
  close = [field for _, field in sorted(scored)[:3]]
  hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "docs/training.md lists the fields"
  return f"unknown config field {name!r}; {hint}"


def check_override_names(names):
  """ConfigError for the first NAME of a --config.NAME flag that is not a field of the training config."""
  known = _known_names()
  for name in names:
    if name not in known:
      raise ConfigError(unknown_field_message(name))


def _number(predicate, requirement):
  def check(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if ok and predicate(value) else requirement
  return check


_positive = _number(lambda v: v > 0, "must be > 0")
_at_least_one = _number(lambda v: v >= 1, "must be >= 1")
_non_negative = _number(lambda v: v >= 0, "must be >= 0")
_fraction = _number(lambda v: 0 <= v < 1, "must be in [0, 1)")

_RULES = {
    "max_bytes": _number(lambda v: v >= 0, "must be >= 0 (0: the whole corpus)"),
    "val_fraction": _fraction,
    "vocab_size": _number(lambda v: v >= 258, "must be >= 258 (256 bytes, EOS and one merge)"),
    "seq_len": _at_least_one,
    "batch_size": _at_least_one,
    "steps": _at_least_one,
    "optim.lr": _positive,
    "optim.warmup_steps": _non_negative,
    "optim.min_lr_ratio": _number(lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "optim.decay_fraction": _number(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "optim.b1": _fraction,
    "optim.b2": _fraction,
    "optim.eps": _positive,
    "optim.weight_decay": _non_negative,
    "optim.grad_clip": _number(lambda v: v >= 0, "must be >= 0 (0: no clipping)"),
    "checkpoint_every": _number(lambda v: v >= 0, "must be >= 0 (0: only the last step)"),
    "keep_checkpoints": _at_least_one,
    "eval_every": _number(lambda v: v >= 0, "must be >= 0 (0: no evaluation)"),
    "eval_batches": _at_least_one,
    "log_every_s": _non_negative,
}


def _get(cfg, name):
  for part in name.split("."):
    cfg = cfg[part]
  return cfg


def validate(cfg):
  """ConfigError listing every unknown or missing field and every unusable value (e.g. "optim.lr=-0.001 must be
  > 0"); returns None when the config can train."""
  names, known = field_names(cfg), field_names(config_lib.base_config())
  problems = [unknown_field_message(n) for n in names if n not in known]
  missing = [n for n in known if n not in names]
  if missing:
    problems.append(f"missing config field(s) {', '.join(missing)} (build configs from base_config())")
  if problems:
    raise ConfigError("; ".join(problems))
  unmet = {name: rule(_get(cfg, name)) for name, rule in _RULES.items()}
  problems = [f"{name}={_get(cfg, name)!r} {requirement}" for name, requirement in unmet.items() if requirement]
  if not unmet["steps"] and not unmet["optim.warmup_steps"] and cfg.optim.warmup_steps > cfg.steps:
    problems.append(f"optim.warmup_steps={cfg.optim.warmup_steps} must be <= steps={cfg.steps}")
  if not isinstance(cfg.data, str) or not cfg.data:
    problems.append(f"data={cfg.data!r} must name a corpus (\"stdlib\", a glob of text files or \"hf:NAME\")")
  if cfg.optim.schedule not in optim.SCHEDULES:
    problems.append(f"optim.schedule={cfg.optim.schedule!r} must be one of {optim.SCHEDULES}")
  try:
    lm_loss_keywords(cfg.loss, cfg.loss_gradient)
  except ValueError as err:
    problems.append(str(err).replace("config.", "", 1))
  if not problems:
    try:
      config_lib.model_config(cfg)
    except (ValueError, TypeError) as err:
      problems.append(f"model: {err}")
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))
