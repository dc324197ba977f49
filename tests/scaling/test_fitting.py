"""The fit: batched L-BFGS, synthetic recovery, agreement with scipy, Epoch AI's published fit, the Huber
maximum-likelihood estimator, best-start selection, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import scaling
from cce_jax.scaling import datasets
from cce_jax.scaling import fitting
from cce_jax.scaling import batched_lbfgs as lbfgs_lib

def _synthetic(law, theta, n_points=200, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  x = np.stack([10 ** rng.uniform(7.5, 10.5, n_points), 10 ** rng.uniform(9, 12, n_points)], axis=1)
  with jax.enable_x64(True):
    log_l = np.asarray(law.log_loss(jnp.asarray(theta), jnp.asarray(x)))
  return x, np.exp(log_l + noise * rng.standard_normal(n_points))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_random_true_parameters(seed):
  rng = np.random.default_rng(100 + seed)
  # Around Chinchilla's fit (log A ≈ 6.2, log B ≈ 7.7, log E ≈ 0.6, exponents ≈ 0.35), on its range of N, D.
  truth = np.array([rng.uniform(5.5, 7), rng.uniform(7, 8.5), rng.uniform(0.4, 0.8), rng.uniform(0.28, 0.42),
                    rng.uniform(0.28, 0.42)])
  x, loss = _synthetic(scaling.CHINCHILLA, truth, noise=1e-3, seed=seed)
  grid = scaling.CHINCHILLA.init_grid()[::100]
  result = scaling.fit(scaling.CHINCHILLA, x, loss, init=grid, max_iter=500)
  np.testing.assert_allclose(result.theta[3:], truth[3:], atol=0.02)
  np.testing.assert_allclose(result.params["E"], np.exp(truth[2]), rtol=0.02)


def test_tied_law_recovers_its_exponent():
  truth = np.array([6.0, 7.0, 0.5, 0.33])
  x, loss = _synthetic(scaling.CHINCHILLA_TIED, truth, seed=4)
  result = scaling.fit(scaling.CHINCHILLA_TIED, x, loss, init=scaling.CHINCHILLA_TIED.init_grid()[::40])
  assert result.params["alpha"] == result.params["beta"]
  np.testing.assert_allclose(result.theta, truth, atol=1e-3)


def test_agrees_with_scipy_from_the_same_start():
  scipy_optimize = pytest.importorskip("scipy.optimize")
  truth = np.array([6.0, 7.5, 0.5, 0.34, 0.37])
  x, loss = _synthetic(scaling.CHINCHILLA, truth, noise=3e-3, seed=5)
  start = np.array([5.0, 5.0, 0.0, 0.5, 0.5])
  ours = scaling.fit(scaling.CHINCHILLA, x, loss, init=start[None])
  with jax.enable_x64(True):
    objective = fitting.objective_fn(scaling.CHINCHILLA, jnp.asarray(x), jnp.log(jnp.asarray(loss)),
                                     jnp.ones(len(loss)), 1e-3, "sum")
    value_and_grad = jax.jit(jax.value_and_grad(objective))
    ref = scipy_optimize.minimize(lambda t: tuple(np.asarray(v) for v in value_and_grad(jnp.asarray(t))), start,
                                  jac=True, method="L-BFGS-B", options=dict(gtol=1e-10, ftol=1e-15, maxiter=5000))
  assert ours.objective <= ref.fun * (1 + 1e-6)
  np.testing.assert_allclose(ours.theta, ref.x, atol=2e-3)


def test_reproduces_epoch_ai_huber_sum_fit_from_the_full_grid(epoch_csv):
  x, loss = datasets.load_epoch_chinchilla(epoch_csv)
  assert x.shape == (240, 2)
  result = scaling.fit(scaling.CHINCHILLA, x, loss)  # Chinchilla's 4,500-start grid, raced down to 64 starts
  assert result.starts == 4500 and result.status_counts["pruned"] > 0
  assert result.converged
  published = {"A": 477.8, "B": 2143.8, "E": 1.8172, "alpha": 0.3473, "beta": 0.3672}
  for name, value in published.items():
    assert result.params[name] == pytest.approx(value, rel=5e-4), name


def test_optax_method_agrees_with_the_batched_lbfgs():
  truth = np.array([6.0, 7.5, 0.5, 0.34, 0.37])
  x, loss = _synthetic(scaling.CHINCHILLA, truth, n_points=60, noise=3e-3, seed=6)
  start = np.array([[6.5, 7.0, 0.3, 0.5, 0.5]])
  ours = scaling.fit(scaling.CHINCHILLA, x, loss, init=start)
  ref = scaling.fit(scaling.CHINCHILLA, x, loss, init=start, method="optax", max_iter=1000)
  assert ours.objective <= ref.objective * (1 + 1e-6)
  np.testing.assert_allclose(ours.theta, ref.theta, atol=2e-3)


def _rosenbrock(theta, scale):
  return scale * (100.0 * (theta[1] - theta[0] ** 2) ** 2 + (1.0 - theta[0]) ** 2)


def test_lbfgs_minimises_every_start_with_its_own_arguments():
  starts = np.array([[-1.2, 1.0], [2.0, -1.0], [0.0, 0.0], [-0.5, 3.0]])
  scales = np.array([1.0, 2.0, 0.5, 3.0])  # per start; the minimum is (1, 1) for every scale
  out = lbfgs_lib.lbfgs(_rosenbrock, starts, (scales,), per_start=(True,), gtol=1e-8, keep=None)
  assert out.theta.shape == (4, 2) and out.theta.dtype == np.float64
  assert out.value.shape == out.grad_norm.shape == out.iterations.shape == out.status.shape == (4,)
  assert (out.status == lbfgs_lib.CONVERGED).all()
  assert (out.grad_norm <= 1e-8).all()
  np.testing.assert_allclose(out.theta, 1.0, atol=1e-6)
  assert (out.evaluations >= out.iterations).all() and (out.iterations > 5).all()


def test_lbfgs_race_prunes_down_to_keep_and_keeps_the_best():
  rng = np.random.default_rng(0)
  starts = rng.uniform(-3, 3, (200, 2))
  out = lbfgs_lib.lbfgs(_rosenbrock, starts, (1.0,), keep=8, race_start=3)
  pruned = out.status == lbfgs_lib.PRUNED
  assert 150 <= pruned.sum() <= 200 - 8
  assert (out.status[~pruned] != lbfgs_lib.ACTIVE).all()
  assert np.nanmin(out.value) < 1e-14


def test_lbfgs_stops_non_finite_starts_and_max_iter():
  out = lbfgs_lib.lbfgs(lambda t: jnp.sum(jnp.log(t) ** 2), np.array([[-1.0, 2.0], [3.0, 4.0]]), max_iter=2)
  assert list(out.status) == [lbfgs_lib.FAILED, lbfgs_lib.MAX_ITER]
  assert out.iterations[1] == 2


def test_best_start_is_the_lowest_objective_even_against_a_converged_plateau():
  values = np.array([5.0, 1.0, np.nan, 1.0 + 1e-12])
  ok = np.array([True, False, False, True])
  # The converged lane 3 ties lane 1 to rounding: it is preferred; the converged plateau (lane 0) never wins.
  assert fitting.select_best(values, ok) == 3
  assert fitting.select_best(values[:3], ok[:3]) == 1
  assert fitting.select_best(np.array([np.nan, np.inf]), np.array([False, False])) == -1


def test_huber_log_normalizer_integrates_the_density():
  for delta in (0.5, 1.345, 3.0):
    u = np.linspace(-400.0, 400.0, 2_000_001)
    z = np.trapezoid(np.exp(-np.asarray(fitting.huber(u, delta))), u)
    assert fitting.huber_log_normalizer(delta) == pytest.approx(np.log(z), abs=1e-7)


def _huber_scale_for_gaussian(delta):
  """c with E[min(v², δ|v|)] = 1 for v = u / c, u ~ N(0, 1): the Huber density's ML scale for unit Gaussian noise."""
  u = np.linspace(-12, 12, 200_001)
  phi = np.exp(-0.5 * u * u) / np.sqrt(2 * np.pi)
  score = lambda c: np.trapezoid(np.minimum((u / c) ** 2, delta * np.abs(u / c)) * phi, u) - 1.0
  lo, hi = 0.1, 10.0
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    lo, hi = (lo, mid) if score(mid) < 0 else (mid, hi)
  return 0.5 * (lo + hi)


def test_huber_ml_recovers_parameters_and_noise_scale():
  truth = np.array([6.0, 7.5, 0.5, 0.34, 0.37])
  noise = 0.02
  x, loss = _synthetic(scaling.CHINCHILLA, truth, n_points=400, noise=noise, seed=7)
  result = scaling.fit(scaling.CHINCHILLA, x, loss, estimator="huber_ml", delta=1.345,
                       init=scaling.CHINCHILLA.init_grid()[::150])
  assert result.estimator == "huber_ml" and result.delta == 1.345
  assert result.converged and result.theta.shape == (5,)
  np.testing.assert_allclose(result.theta[3:], truth[3:], atol=0.03)
  np.testing.assert_allclose(result.params["E"], np.exp(truth[2]), rtol=0.03)
  expected_sigma = noise * _huber_scale_for_gaussian(result.delta)  # ≈ 0.8 · noise for δ = 1.345
  assert result.sigma == pytest.approx(expected_sigma, rel=0.12)
  # The objective is the negative log-likelihood at the fitted (theta, log sigma).
  with jax.enable_x64(True):
    r = np.asarray(scaling.CHINCHILLA.log_loss(jnp.asarray(result.theta), jnp.asarray(x))) - np.log(loss)
  nll = np.sum(np.asarray(fitting.huber(r / result.sigma, result.delta)) + np.log(result.sigma)
               + fitting.huber_log_normalizer(result.delta))
  assert result.objective == pytest.approx(nll, rel=1e-8)


def test_huber_ml_reproduces_epoch_ai_published_estimates(epoch_csv):
  # Besiroglu et al. (2024), Table 1: A 482.01, B 2085.43, E 1.82, α 0.3478, β 0.3658.
  x, loss = datasets.load_epoch_chinchilla(epoch_csv)
  result = scaling.fit(scaling.CHINCHILLA, x, loss, estimator="huber_ml", init=scaling.CHINCHILLA.init_grid()[::300])
  assert result.converged and result.delta == 1e-3
  published = {"A": 482.01, "B": 2085.43, "E": 1.82, "alpha": 0.3478, "beta": 0.3658}
  for name, value in published.items():
    assert result.params[name] == pytest.approx(value, rel=5e-4 if name != "E" else 5e-3), name
  # Nearly Laplace: σ/δ is the mean absolute residual.
  with jax.enable_x64(True):
    r = np.asarray(scaling.CHINCHILLA.log_loss(jnp.asarray(result.theta), jnp.asarray(x))) - np.log(loss)
  assert result.sigma / result.delta == pytest.approx(np.mean(np.abs(r)), rel=1e-3)


def test_mean_reduction_warns():
  x, loss = _synthetic(scaling.CHINCHILLA, np.array([6.0, 7.0, 0.5, 0.3, 0.3]), n_points=20)
  with pytest.warns(UserWarning, match="stop near their start"):
    scaling.fit(scaling.CHINCHILLA, x, loss, reduction="mean", init=np.array([[5.0, 5.0, 0.0, 0.5, 0.5]]),
                max_iter=5)


@pytest.mark.parametrize("mutate,match", [
    (lambda x, l: (_set(x, (0, 0), 0.0), l), "covariates must be positive"),
    (lambda x, l: (x, _set(l, 1, -1.0)), "losses must be positive"),
    (lambda x, l: (x, _set(l, 2, np.nan)), "NaN"),
    (lambda x, l: (x[:3], l[:3]), "at least"),
    (lambda x, l: (x[:, :1], l), "shape"),
    (lambda x, l: (x, l[:-1]), "one per row"),
])
def test_bad_input(mutate, match):
  x, loss = _synthetic(scaling.CHINCHILLA, np.array([6.0, 7.0, 0.5, 0.3, 0.3]), n_points=20)
  bad_x, bad_loss = mutate(x.copy(), loss.copy())
  with pytest.raises(ValueError, match=match):
    scaling.fit(scaling.CHINCHILLA, bad_x, bad_loss, init=np.zeros((1, 5)))


def _set(a, idx, value):
  a = np.array(a, copy=True)
  a[idx] = value
  return a


@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="l2"), "estimator"),
    (dict(method="scipy"), "method"),
    (dict(reduction="median"), "reduction"),
    (dict(delta=0.0), "delta"),
    (dict(keep=0), "keep"),
    (dict(init=np.zeros((2, 4))), "columns"),
    (dict(init=np.full((1, 5), np.nan)), "NaN"),
    (dict(weights=np.zeros(20)), "weights"),
])
def test_bad_options(kwargs, match):
  x, loss = _synthetic(scaling.CHINCHILLA, np.array([6.0, 7.0, 0.5, 0.3, 0.3]), n_points=20)
  kwargs = {"init": np.zeros((1, 5)), **kwargs}
  with pytest.raises(ValueError, match=match):
    scaling.fit(scaling.CHINCHILLA, x, loss, **kwargs)


def test_lbfgs_bad_arguments():
  with pytest.raises(ValueError, match="per_start"):
    lbfgs_lib.lbfgs(_rosenbrock, np.zeros((3, 2)), (np.ones(3),), per_start=(True, False))
  with pytest.raises(ValueError, match="leading axis"):
    lbfgs_lib.lbfgs(_rosenbrock, np.zeros((3, 2)), (np.ones(4),), per_start=(True,))
  with pytest.raises(ValueError, match="shape"):
    lbfgs_lib.lbfgs(_rosenbrock, np.zeros(3), (1.0,))


def test_unknown_law():
  with pytest.raises(ValueError, match="unknown law"):
    scaling.get_law("kaplan2020")

