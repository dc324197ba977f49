"""Backtests of scaling-law fits: fit on the small groups (budgets, model sizes, ...), predict the held-out ones.

Generic over the fitting procedure: a `FitFn` maps training data to a predictor,
  fit_fn(x [M, K], loss [M], weights [M] | None) -> predict,   predict(x [P, K]) -> predicted loss [P] (> 0),
and `law_fit_fn(law, **fit_kwargs)` builds one from `fitting.fit`. Points are grouped by `groups` [points] (any
ordered keys: a compute budget, a model size, a `log_bins` label).

Per test point: log error e = ln L̂ − ln L and relative error r = L̂ / L − 1. Per group and overall:
MAE of log-loss = mean |e| and mean relative error = mean |r|.

* `extrapolate`: fit on the `train_groups` smallest groups, predict the largest group (or every larger group).
* `leave_one_group_out`: for each group, fit on all the others and predict it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from cce_jax.scaling import fitting
from cce_jax.scaling.laws import Law

FitFn = Callable[..., Callable[[np.ndarray], np.ndarray]]


def law_fit_fn(law: Law, **fit_kwargs) -> FitFn:
  """A FitFn that fits `law` with `fitting.fit(law, x, loss, weights=..., **fit_kwargs)` and predicts
  exp(law.log_loss(theta, x)); each predictor carries its FitResult as `predict.fit_result`."""

  def fit_fn(x, loss, weights=None):
    result = fitting.fit(law, x, loss, weights=weights, **fit_kwargs)
    theta = np.asarray(result.theta, np.float64)

    def predict(x_new):
      return fitting.predict_loss(law, theta, x_new)

    predict.fit_result = result
    return predict

  return fit_fn


def log_bins(values, width: float = 0.5) -> np.ndarray:
  """Group labels [points]: floor(log10 value / width) · width, the lower edge (in log10) of each value's bin."""
  values = np.asarray(values, np.float64)
  if not np.isfinite(values).all() or (values <= 0).any():
    raise ValueError("values to bin must be finite and positive")
  if not width > 0:
    raise ValueError(f"bin width must be positive, got {width}")
  return np.floor(np.log10(values) / width) * width


@dataclasses.dataclass(frozen=True)
class GroupError:
  """Errors on one held-out group: its key, its number of points, MAE of ln L, mean |L̂/L − 1|, and the keys of
  the groups the fit was trained on."""

  group: float
  points: int
  mae_log: float
  mean_abs_rel: float
  train_groups: tuple


@dataclasses.dataclass(frozen=True)
class Backtest:
  """Per-point arrays over every held-out point ([P]: index into the input, group key, observed and predicted loss,
  log and relative errors) and per-group summaries."""

  kind: str
  index: np.ndarray
  group: np.ndarray
  observed: np.ndarray
  predicted: np.ndarray
  per_group: tuple[GroupError, ...]

  @property
  def log_error(self) -> np.ndarray:
    return np.log(self.predicted) - np.log(self.observed)

  @property
  def rel_error(self) -> np.ndarray:
    return self.predicted / self.observed - 1.0

  @property
  def mae_log(self) -> float:
    """Mean |ln L̂ − ln L| over every held-out point."""
    return float(np.mean(np.abs(self.log_error)))

  @property
  def mean_abs_rel(self) -> float:
    """Mean |L̂ / L − 1| over every held-out point."""
    return float(np.mean(np.abs(self.rel_error)))

  def summary(self) -> dict:
    """JSON-ready summary: overall and per-group errors."""
    return {"kind": self.kind, "points": int(self.index.size), "mae_log": self.mae_log,
            "mean_abs_rel": self.mean_abs_rel,
            "per_group": [{"group": _plain(g.group), "points": g.points, "mae_log": g.mae_log,
                           "mean_abs_rel": g.mean_abs_rel, "train_groups": [_plain(t) for t in g.train_groups]}
                          for g in self.per_group]}


def _plain(v):
  return v.item() if isinstance(v, np.generic) else v


def _check(x, loss, groups, weights):
  x = np.asarray(x, np.float64)
  loss = np.asarray(loss, np.float64)
  groups = np.asarray(groups)
  if x.ndim == 1:
    x = x[:, None]
  if x.ndim != 2 or loss.shape != (x.shape[0],) or groups.shape != loss.shape:
    raise ValueError(f"x [points, K], loss [points] and groups [points] must agree, got {x.shape}, {loss.shape}, "
                     f"{groups.shape}")
  if not np.isfinite(loss).all() or (loss <= 0).any():
    raise ValueError("losses must be finite and positive")
  if weights is not None:
    weights = np.asarray(weights, np.float64)
    if weights.shape != loss.shape:
      raise ValueError(f"weights must have shape {loss.shape}, got {weights.shape}")
  keys = np.unique(groups)
  if keys.size < 2:
    raise ValueError(f"a backtest needs at least 2 groups, got {keys.size}")
  return x, loss, groups, weights, keys


def _fold(x, loss, groups, weights, fit_fn, train_keys, test_keys):
  train = np.isin(groups, train_keys)
  predict = fit_fn(x[train], loss[train], None if weights is None else weights[train])
  idx, errs = [], []
  for key in test_keys:
    test = np.flatnonzero(groups == key)
    pred = np.asarray(predict(x[test]), np.float64).reshape(-1)
    if pred.shape != test.shape:
      raise ValueError(f"the predictor must return one loss per point: group {key!r} has {test.size} points, "
                       f"got shape {pred.shape}")
    if not np.isfinite(pred).all() or (pred <= 0).any():
      raise ValueError(f"the predictor returned non-finite or non-positive losses for group {key!r}")
    e = np.log(pred) - np.log(loss[test])
    errs.append((GroupError(group=key, points=int(test.size), mae_log=float(np.mean(np.abs(e))),
                            mean_abs_rel=float(np.mean(np.abs(pred / loss[test] - 1.0))),
                            train_groups=tuple(train_keys)), pred))
    idx.append(test)
  return idx, errs


def _collect(kind, folds, loss, groups):
  idx = np.concatenate([i for f_idx, _ in folds for i in f_idx])
  pred = np.concatenate([p for _, f_err in folds for _, p in f_err])
  per_group = tuple(g for _, f_err in folds for g, _ in f_err)
  return Backtest(kind=kind, index=idx, group=groups[idx], observed=loss[idx], predicted=pred, per_group=per_group)


def extrapolate(x, loss, groups, fit_fn: FitFn, *, train_groups: int, predict: str = "largest",
                weights=None) -> Backtest:
  """Fits on the `train_groups` smallest group keys and predicts the largest group ("largest") or every group above
  the training ones ("rest"). x [points, K], loss [points], groups [points], weights [points] | None."""
  x, loss, groups, weights, keys = _check(x, loss, groups, weights)
  if not 1 <= train_groups <= keys.size - 1:
    raise ValueError(f"train_groups must be between 1 and {keys.size - 1} (there are {keys.size} groups), "
                     f"got {train_groups}")
  if predict not in ("largest", "rest"):
    raise ValueError(f"predict must be 'largest' or 'rest', got {predict!r}")
  test_keys = keys[-1:] if predict == "largest" else keys[train_groups:]
  folds = [_fold(x, loss, groups, weights, fit_fn, keys[:train_groups], test_keys)]
  return _collect(f"extrapolate(train={train_groups}, predict={predict})", folds, loss, groups)


def leave_one_group_out(x, loss, groups, fit_fn: FitFn, *, weights=None) -> Backtest:
  """For each group key, fits on every other group and predicts it (one fit per group)."""
  x, loss, groups, weights, keys = _check(x, loss, groups, weights)
  folds = [_fold(x, loss, groups, weights, fit_fn, keys[keys != key], [key]) for key in keys]
  return _collect("leave_one_group_out", folds, loss, groups)
