"""Bootstrap: draws, per-draw refits in one batch, interval coverage on synthetic data, Epoch AI's data, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from cce_jax import scaling
from cce_jax.scaling import bootstrap
from cce_jax.scaling import datasets
from cce_jax.scaling.laws import Law

def _saturating_log_loss(theta, x):
  # L(N) = A / N^alpha + E, fitted as LSE(a - alpha log N, e).
  log_n = jnp.log(x[:, 0])
  return logsumexp(jnp.stack([theta[0] - theta[2] * log_n, jnp.broadcast_to(theta[1], log_n.shape)], -1), -1)


SATURATING = Law(
    name="saturating", params=("a", "e", "alpha"), covariates=("N",), log_loss=_saturating_log_loss,
    published=lambda t: {"A": float(np.exp(t[0])), "E": float(np.exp(t[1])), "alpha": float(t[2])},
    grid={"a": [0.0, 5.0], "e": [0.0], "alpha": [0.2, 0.5]})


def _synthetic(law, theta, x, noise, rng):
  with jax.enable_x64(True):
    log_l = np.asarray(law.log_loss(jnp.asarray(theta), jnp.asarray(x)))
  return np.exp(log_l + noise * rng.standard_normal(len(x)))


def _chinchilla_data(n_points=40, noise=0.02, seed=0):
  rng = np.random.default_rng(seed)
  x = np.stack([10 ** rng.uniform(7.5, 10.5, n_points), 10 ** rng.uniform(9, 12, n_points)], axis=1)
  truth = np.array([6.0, 7.5, 0.5, 0.34, 0.37])
  return x, _synthetic(scaling.CHINCHILLA, truth, x, noise, rng), truth


@pytest.fixture(scope="module")
def chinchilla_fit():
  """(x [40, 2], loss [40], full-data FitResult) of noisy synthetic Chinchilla data."""
  x, loss, truth = _chinchilla_data()
  return x, loss, scaling.fit(scaling.CHINCHILLA, x, loss, init=np.stack([truth + 0.2, truth - 0.2]))


def test_draws_have_the_data_shape():
  rng = np.random.default_rng(0)
  log_l = np.log(np.linspace(2.0, 3.0, 30))
  log_l_hat = log_l + 0.01 * rng.standard_normal(30)
  w = np.ones(30)
  draw_log_l, draw_w = bootstrap.draw_data("pairs", rng, log_l_hat, log_l, w, 500, 3)
  assert draw_log_l.shape == draw_w.shape == (500, 30)
  np.testing.assert_array_equal(draw_log_l, np.broadcast_to(log_l, (500, 30)))
  assert (draw_w == np.round(draw_w)).all() and (draw_w.sum(axis=1) == 30).all()
  assert 0.3 < (draw_w == 0).mean() < 0.44  # (1 − 1/N)^N ≈ 0.36 of the points are left out of a draw

  draw_log_l, draw_w = bootstrap.draw_data("gaussian", rng, log_l_hat, log_l, w, 2000, 3)
  np.testing.assert_array_equal(draw_w, 1.0)
  r = log_l_hat - log_l
  noise = draw_log_l - log_l_hat
  assert noise.std() == pytest.approx(np.sqrt(np.sum(r * r) / (30 - 3)), rel=0.02)

  draw_log_l, _ = bootstrap.draw_data("residuals", rng, log_l_hat, log_l, w, 50, 3)
  assert np.isin(np.round(log_l_hat - draw_log_l, 12), np.round(r, 12)).all()


def test_result_shapes_dtypes_and_the_full_data_estimate(chinchilla_fit):
  x, loss, full = chinchilla_fit
  compute = np.array([1e20, 1e22, 1e24])
  result = bootstrap.bootstrap_fit(scaling.CHINCHILLA, x, loss, draws=16, fit_result=full, extra_starts=2,
                                   compute=compute, seed=3)
  assert result.draws == 16 and result.kind == "pairs" and result.fit is full
  assert result.theta.shape == (16, 5) and result.theta.dtype == np.float64
  assert result.objective.shape == (16,) and result.converged.dtype == bool
  assert result.failed == int((~result.converged).sum())
  assert set(result.params) == {"A", "B", "E", "alpha", "beta"} and set(result.derived) == {"a", "b"}
  for values in (*result.params.values(), *result.derived.values()):
    assert values.shape == (16,) and values.dtype == np.float64
  np.testing.assert_allclose(result.derived["a"] + result.derived["b"], 1.0)
  for name, value in full.params.items():
    assert result.estimate[name] == value
  for name, (lo, hi) in result.intervals.items():
    assert lo <= hi, name
  assert result.n_opt.shape == result.d_opt.shape == (16, 3)
  np.testing.assert_allclose(6 * result.n_opt * result.d_opt, np.broadcast_to(compute, (16, 3)), rtol=1e-9)
  for name in ("N_opt", "D_opt"):
    assert result.frontier_intervals[name].shape == (2, 3)
    assert (result.frontier_intervals[name][0] <= result.frontier_intervals[name][1]).all()
  n_hat, _ = scaling.chinchilla_optimum(full.params, compute)
  np.testing.assert_allclose(result.frontier_estimate["N_opt"], n_hat)


def test_extra_starts_never_do_worse_than_the_full_data_start(chinchilla_fit):
  x, loss, full = chinchilla_fit
  one = bootstrap.bootstrap_fit(scaling.CHINCHILLA, x, loss, draws=12, fit_result=full, seed=5)
  more = bootstrap.bootstrap_fit(scaling.CHINCHILLA, x, loss, draws=12, fit_result=full, seed=5, extra_starts=3)
  assert (more.objective <= one.objective * (1 + 1e-9) + 1e-15).all()


def test_unconverged_draws_are_dropped_and_counted(chinchilla_fit):
  x, loss, full = chinchilla_fit
  result = bootstrap.bootstrap_fit(scaling.CHINCHILLA, x, loss, draws=10, fit_result=full, max_iter=1, seed=1)
  assert result.failed == 10 and not result.converged.any()
  assert all(np.isnan(bound) for interval in result.intervals.values() for bound in interval)


def test_huber_ml_bootstrap_reports_sigma():
  x, loss, truth = _chinchilla_data(noise=0.03, seed=4)
  full = scaling.fit(scaling.CHINCHILLA, x, loss, estimator="huber_ml", delta=1.345, init=truth[None] + 0.2)
  result = bootstrap.bootstrap_fit(scaling.CHINCHILLA, x, loss, draws=12, estimator="huber_ml", delta=1.345,
                                   fit_result=full, kind="gaussian")
  assert result.theta.shape == (12, 6)
  assert result.estimate["sigma"] == full.sigma
  lo, hi = result.intervals["sigma"]
  assert 0.005 < lo <= hi < 0.1


def test_intervals_cover_the_truth_at_about_the_nominal_rate():
  # 20 synthetic data sets of a saturating power law with Gaussian noise; 90% intervals from 100 draws each.
  truth = np.array([5.0, 0.5, 0.3])
  published = SATURATING.published(truth)
  names = ("A", "E", "alpha")
  covered = {"pairs": [], "gaussian": []}
  widths, estimates = [], []
  for seed in range(20):
    rng = np.random.default_rng(1000 + seed)
    x = 10 ** rng.uniform(6, 11, 50)[:, None]
    loss = _synthetic(SATURATING, truth, x, 0.02, rng)
    full = scaling.fit(SATURATING, x, loss, init=truth[None] + 0.2)
    estimates.append(full.params["alpha"])
    for kind in covered:
      result = bootstrap.bootstrap_fit(SATURATING, x, loss, draws=100, kind=kind, fit_result=full, seed=seed)
      assert result.failed <= 2 and not result.derived
      covered[kind].append([result.intervals[n][0] <= published[n] <= result.intervals[n][1] for n in names])
      if kind == "pairs":
        widths.append(np.subtract(*result.intervals["alpha"][::-1]))
  for kind, hits in covered.items():
    assert 0.75 <= np.mean(hits) <= 0.99, (kind, np.mean(hits, axis=0))
  # The intervals are as wide as the estimator's spread over data sets (a 90% normal interval: ±1.645 sd).
  ratio = np.mean(widths) / (2 * 1.645 * np.std(estimates, ddof=1))
  assert 0.6 < ratio < 1.7, ratio


def test_epoch_ai_pairs_bootstrap(epoch_csv):
  x, loss = datasets.load_epoch_chinchilla(epoch_csv)
  full = scaling.fit(scaling.CHINCHILLA, x, loss, init=scaling.CHINCHILLA.init_grid()[::100])
  result = bootstrap.bootstrap_fit(scaling.CHINCHILLA, x, loss, draws=100, fit_result=full, compute=[5.76e23])
  assert result.failed <= 2
  for name, (lo, hi) in result.intervals.items():
    assert lo < result.estimate[name] < hi, name
  lo, hi = result.intervals["a"]
  assert 0.45 < lo and hi < 0.58  # N_opt ∝ C^a with a ≈ 0.51 (Besiroglu et al.)
  assert result.frontier_intervals["N_opt"][0, 0] < result.frontier_estimate["N_opt"][0] \
      < result.frontier_intervals["N_opt"][1, 0]


def test_percentile_interval():
  assert bootstrap.percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
  assert bootstrap.percentile_interval([np.nan, 1.0, np.inf, 3.0], 0.5) == pytest.approx((1.5, 2.5))
  assert all(np.isnan(bootstrap.percentile_interval([np.nan], 0.9)))
  with pytest.raises(ValueError, match="level"):
    bootstrap.percentile_interval([1.0, 2.0], 1.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="jackknife"), "kind"),
    (dict(draws=1), "draws"),
    (dict(draws=2.5), "draws"),
    (dict(level=0.0), "level"),
    (dict(extra_starts=-1), "extra_starts"),
    (dict(compute=[1e20, -1.0]), "compute"),
    (dict(estimator="huber_ml"), "fit_result"),
    (dict(delta=0.01), "fit_result"),
    (dict(estimator="l1"), "estimator"),
])
def test_bad_arguments(kwargs, match, chinchilla_fit):
  x, loss, full = chinchilla_fit
  with pytest.raises(ValueError, match=match):
    bootstrap.bootstrap_fit(scaling.CHINCHILLA, x, loss, fit_result=full, **kwargs)


def test_frontier_needs_a_function_for_laws_without_a_closed_form():
  rng = np.random.default_rng(0)
  truth = np.array([5.0, 0.5, 0.3])
  x = 10 ** rng.uniform(6, 11, 50)[:, None]
  loss = _synthetic(SATURATING, truth, x, 0.01, rng)
  full = scaling.fit(SATURATING, x, loss, init=truth[None])
  with pytest.raises(ValueError, match="frontier"):
    bootstrap.bootstrap_fit(SATURATING, x, loss, draws=4, fit_result=full, compute=[1e20])
  result = bootstrap.bootstrap_fit(SATURATING, x, loss, draws=4, fit_result=full, compute=[1e20, 1e22],
                               frontier=lambda p, c: (np.sqrt(c / 6), np.sqrt(c / 6)))
  np.testing.assert_allclose(result.n_opt, np.broadcast_to(np.sqrt(np.array([1e20, 1e22]) / 6), (4, 2)))
