"""Backtests: errors computed by hand, a correct law predicts held-out budgets, folds train on the right groups."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import scaling
from cce_jax.scaling import backtest

TRUTH = np.array([6.0, 7.5, 0.5, 0.34, 0.37])  # fit-space Chinchilla parameters (a, b, e, alpha, beta)


def _synthetic(n_points=60, seed=0, noise=0.0):
  rng = np.random.default_rng(seed)
  x = np.stack([10 ** rng.uniform(7.5, 10, n_points), 10 ** rng.uniform(9, 11.5, n_points)], axis=1)
  with jax.enable_x64(True):
    log_l = np.asarray(scaling.CHINCHILLA.log_loss(jnp.asarray(TRUTH), jnp.asarray(x)))
  return x, np.exp(log_l + noise * rng.standard_normal(n_points))


def _constant_fit_fn(calls):
  """Predicts the training mean everywhere; records which points each fit saw."""

  def fit_fn(x, loss, weights=None):
    calls.append((x.copy(), weights))
    mean = float(np.mean(loss))
    return lambda x_new: np.full(len(x_new), mean)

  return fit_fn


def test_errors_match_a_hand_computation():
  x = np.arange(1.0, 7.0)[:, None]
  loss = np.array([2.0, 2.0, 3.0, 3.0, 4.0, 5.0])
  groups = np.array([1, 1, 2, 2, 3, 3])
  calls = []
  result = backtest.extrapolate(x, loss, groups, _constant_fit_fn(calls), train_groups=2)
  # Trained on groups 1 and 2 (mean 2.5), predicts group 3 (4 and 5).
  assert len(calls) == 1 and calls[0][0].ravel().tolist() == [1, 2, 3, 4]
  assert result.index.tolist() == [4, 5] and result.group.tolist() == [3, 3]
  np.testing.assert_allclose(result.rel_error, [2.5 / 4 - 1, 2.5 / 5 - 1])
  np.testing.assert_allclose(result.log_error, np.log([2.5 / 4, 2.5 / 5]))
  assert result.mae_log == pytest.approx(np.mean(np.abs(np.log([2.5 / 4, 2.5 / 5]))))
  assert result.mean_abs_rel == pytest.approx((1.5 / 4 + 2.5 / 5) / 2)
  (g,) = result.per_group
  assert g.group == 3 and g.points == 2 and g.train_groups == (1, 2)


def test_predict_rest_reports_every_larger_group():
  x = np.arange(1.0, 7.0)[:, None]
  loss = np.array([2.0, 2.0, 3.0, 3.0, 4.0, 5.0])
  result = backtest.extrapolate(x, loss, [1, 1, 2, 2, 3, 3], _constant_fit_fn([]), train_groups=1, predict="rest")
  assert [g.group for g in result.per_group] == [2, 3]
  assert result.per_group[0].mean_abs_rel == pytest.approx(1 / 3)
  assert result.summary()["points"] == 4


def test_leave_one_group_out_trains_on_the_others_and_passes_weights():
  x = np.arange(1.0, 7.0)[:, None]
  loss = np.array([2.0, 2.0, 3.0, 3.0, 4.0, 5.0])
  weights = np.arange(6.0) + 1
  calls = []
  result = backtest.leave_one_group_out(x, loss, [1, 1, 2, 2, 3, 3], _constant_fit_fn(calls), weights=weights)
  assert [c[0].ravel().tolist() for c in calls] == [[3, 4, 5, 6], [1, 2, 5, 6], [1, 2, 3, 4]]
  assert [c[1].tolist() for c in calls] == [[3, 4, 5, 6], [1, 2, 5, 6], [1, 2, 3, 4]]
  assert sorted(result.index.tolist()) == list(range(6))
  # Group 2 held out: the mean of the others is 3.25.
  assert result.per_group[1].mean_abs_rel == pytest.approx(0.25 / 3)


def test_the_true_law_extrapolates_from_small_budgets():
  x, loss = _synthetic()
  groups = backtest.log_bins(6 * x[:, 0] * x[:, 1], width=1.0)
  fit_fn = backtest.law_fit_fn(scaling.CHINCHILLA, init=TRUTH[None] + 0.3)
  result = backtest.extrapolate(x, loss, groups, fit_fn, train_groups=np.unique(groups).size - 1)
  assert result.per_group[0].group == groups.max()
  assert result.mae_log < 1e-4 and result.mean_abs_rel < 1e-4


def test_a_misspecified_law_shows_larger_errors_out_of_sample():
  # The tied law (alpha = beta) on data with alpha != beta: its error on the largest models exceeds the untied law's.
  x, loss = _synthetic(seed=1, noise=1e-3)
  groups = backtest.log_bins(x[:, 0], width=1.0)
  start = TRUTH[None] + 0.2
  untied = backtest.extrapolate(x, loss, groups, backtest.law_fit_fn(scaling.CHINCHILLA, init=start),
                                train_groups=2)
  tied = backtest.extrapolate(x, loss, groups, backtest.law_fit_fn(scaling.CHINCHILLA_TIED, init=start[:, :4]),
                              train_groups=2)
  assert untied.mae_log < 3e-3
  assert tied.mae_log > 2 * untied.mae_log


def test_log_bins():
  np.testing.assert_allclose(backtest.log_bins([1e18, 3e18, 4e18, 1e19], width=0.5), [18, 18, 18.5, 19])
  with pytest.raises(ValueError, match="positive"):
    backtest.log_bins([0.0, 1.0])
  with pytest.raises(ValueError, match="width"):
    backtest.log_bins([1.0], width=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=[1, 1, 1, 1]), "at least 2 groups"),
    (dict(groups=[1, 1, 2]), "must agree"),
    (dict(loss=[1.0, -1.0, 2.0, 2.0]), "positive"),
    (dict(train_groups=2), "between 1 and 1"),
    (dict(predict="all"), "'largest' or 'rest'"),
    (dict(weights=[1.0, 1.0]), "weights must have shape"),
])
def test_bad_input(kwargs, match):
  args = dict(x=np.ones((4, 2)), loss=[1.0, 2.0, 2.0, 2.0], groups=[1, 1, 2, 2], train_groups=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    backtest.extrapolate(args.pop("x"), args.pop("loss"), args.pop("groups"), _constant_fit_fn([]), **args)


def test_bad_predictor_output():
  x, loss = np.ones((4, 1)), np.ones(4)
  with pytest.raises(ValueError, match="one loss per point"):
    backtest.leave_one_group_out(x, loss, [1, 1, 2, 2], lambda *a: (lambda x_new: np.ones(3)))
  with pytest.raises(ValueError, match="non-positive"):
    backtest.leave_one_group_out(x, loss, [1, 1, 2, 2], lambda *a: (lambda x_new: np.zeros(len(x_new))))
