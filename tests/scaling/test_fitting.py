"""The Chinchilla fit: synthetic recovery, agreement with scipy, Epoch AI's published fit, bad input."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import scaling
from cce_jax.scaling import data
from cce_jax.scaling import fitting

EPOCH_CSV = (pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "scaling" /
             "epoch_chinchilla_replication" / "svg_extracted_data.csv")


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


@pytest.mark.skipif(not EPOCH_CSV.exists(), reason="Epoch AI's Chinchilla data is not present")
def test_reproduces_epoch_ai_huber_sum_fit():
  x, loss = data.load_epoch_chinchilla(str(EPOCH_CSV))
  assert x.shape == (240, 2)
  result = scaling.fit(scaling.CHINCHILLA, x, loss, init=scaling.CHINCHILLA.init_grid()[::100])
  published = {"A": 477.8, "B": 2143.8, "E": 1.8172, "alpha": 0.3473, "beta": 0.3672}
  for name, value in published.items():
    assert result.params[name] == pytest.approx(value, rel=5e-4), name


def test_mean_reduction_warns():
  x, loss = _synthetic(scaling.CHINCHILLA, np.array([6.0, 7.0, 0.5, 0.3, 0.3]), n_points=20)
  with pytest.warns(UserWarning, match="stop near its start"):
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


def test_unknown_law():
  with pytest.raises(ValueError, match="unknown law"):
    scaling.get_law("kaplan2020")

