"""The law families beyond Chinchilla: registry, shapes, synthetic recovery, formulas against plain references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import scaling
from cce_jax.scaling import datasets
from cce_jax.scaling import sources
from cce_jax.scaling.laws import bivariate
from cce_jax.scaling.laws import data_constrained
from cce_jax.scaling.laws import kaplan
from cce_jax.scaling.laws import lr_schedule
from cce_jax.scaling.laws import overtraining
from cce_jax.scaling.laws import saturating

LUO = sources.folder("luo2025_multipower_lr_schedules")


def _log_loss(law, theta, x):
  with jax.enable_x64(True):
    return np.asarray(law.log_loss(jnp.asarray(theta, jnp.float64), jnp.asarray(x, jnp.float64)))


def _noisy(law, theta, x, rng, noise):
  return np.exp(_log_loss(law, theta, x) + noise * rng.standard_normal(len(x)))


def _assert_close(got, want, atol, what=""):
  got, want, atol = (np.asarray(v, np.float64) for v in (got, want, atol))
  bad = ~(np.abs(got - want) <= atol)
  assert not bad.any(), f"{what}: got {got}, want {want} (atol {atol}); off at {np.flatnonzero(bad)}"


def _uniform_log10(rng, lo, hi, n):
  return 10.0 ** rng.uniform(lo, hi, n)


# Each case: law, random true fit-space theta, covariates [N, K] on the law's domain, checks on the fit.
def _kaplan_case(rng):
  truth = np.array([rng.uniform(29, 33), rng.uniform(28, 32), rng.uniform(0.06, 0.1), rng.uniform(0.08, 0.12)])
  n = _uniform_log10(rng, 6, 9.5, 120)
  # D such that the two terms are within 10^±1.5 of each other: otherwise one of them is not identified
  n_term = (np.exp(truth[0]) / n) ** (truth[2] / truth[3])
  x = np.stack([n, np.exp(truth[1]) / (n_term * _uniform_log10(rng, -1.5, 1.5, 120))], axis=1)
  return kaplan.KAPLAN, truth, x, dict(atol=[0.3, 0.3, 0.003, 0.003])


def _saturating_case(rng):
  truth = np.array([np.log(rng.uniform(1.5, 2.5)), rng.uniform(36, 41), rng.uniform(0.2, 0.5)])
  return saturating.SATURATING, truth, _uniform_log10(rng, 15, 22, 60)[:, None], dict(atol=[0.01, 0.3, 0.02])


def _bivariate_case(rng):
  truth = np.array([rng.uniform(-1.0, 0.5), rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.6),
                    np.log(rng.uniform(0.8, 1.5))])
  x = np.stack([_uniform_log10(rng, 7, 9.5, 80), _uniform_log10(rng, 7, 9.5, 80)], axis=1)
  return bivariate.BIVARIATE, truth, x, dict(atol=[0.05, 0.02, 0.02, 0.01])


def _data_constrained_case(rng):
  truth = np.array([np.log(rng.uniform(5, 30)), np.log(rng.uniform(2, 10))])
  n = _uniform_log10(rng, 8, 10, 120)
  u = n * _uniform_log10(rng, -1, 2, 120)  # from 10x excess parameters to compute-optimal data and beyond
  d = u * _uniform_log10(rng, 0, 2, 120)  # 1 to 100 epochs
  return data_constrained.MUENNIGHOFF_DECAY, truth, np.stack([n, d, u], axis=1), dict(atol=[0.15, 0.15])


def _data_constrained_full_case(rng):
  truth = np.array([rng.uniform(5.8, 6.8), rng.uniform(6.8, 7.8), np.log(rng.uniform(1.6, 2.0)), rng.uniform(0.3, 0.4),
                    rng.uniform(0.3, 0.4), np.log(rng.uniform(5, 30)), np.log(rng.uniform(2, 10))])
  n = _uniform_log10(rng, 7.5, 10, 200)
  u = n * _uniform_log10(rng, -1, 2.5, 200)
  d = u * _uniform_log10(rng, 0, 2, 200)
  return (data_constrained.DATA_CONSTRAINED, truth, np.stack([n, d, u], axis=1),
          dict(atol=[0.05, 0.05, 0.01, 0.005, 0.005, 0.1, 0.15]))


def _overtraining_case(rng):
  truth = np.array([rng.uniform(5, 7), rng.uniform(5, 7), np.log(rng.uniform(1.5, 2.0)), rng.uniform(0.1, 0.2)])
  n = _uniform_log10(rng, 7, 9.5, 60)
  x = overtraining.overtraining_covariates(n, n * _uniform_log10(rng, 0.7, 2.8, 60))
  return overtraining.OVERTRAINING, truth, x, dict(atol=[0.1, 0.1, 0.01, 0.005])


def _error_case(rng):
  eps, gamma = rng.uniform(0.7, 0.8), rng.uniform(0.6, 1.4)
  k = rng.uniform(0.4, 0.8) * eps * np.exp(2.5 * gamma)  # Err(2.5) = eps (1 − U(0.4, 0.8)) > 0
  truth = np.log([eps, k, gamma])
  return overtraining.DOWNSTREAM_ERROR, truth, rng.uniform(2.5, 6.0, 50)[:, None], dict(atol=[0.02, 0.1, 0.05])


CASES = {"kaplan": _kaplan_case, "saturating": _saturating_case, "bivariate": _bivariate_case,
         "data_constrained": _data_constrained_full_case, "data_constrained_muennighoff": _data_constrained_case,
         "overtraining": _overtraining_case, "downstream_error": _error_case}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recovers_random_true_parameters(name):
  rng = np.random.default_rng(sorted(CASES).index(name))
  law, truth, x, tol = CASES[name](rng)
  assert law is scaling.get_law(name)
  loss = _noisy(law, truth, x, rng, noise=5e-4)
  starts = law.init_grid()
  result = scaling.fit(law, x, loss, init=starts[rng.choice(len(starts), min(len(starts), 12), replace=False)])
  _assert_close(result.theta, truth, tol["atol"], f"{name} {result.params}")


@pytest.mark.parametrize("name", ["kaplan", "saturating", "bivariate", "data_constrained",
                                  "data_constrained_muennighoff", "overtraining", "downstream_error"])
def test_registry_shapes_and_published_names(name):
  law = scaling.get_law(name)
  assert set(law.grid) == set(law.params)
  grid = law.init_grid()
  assert grid.shape == (np.prod([len(law.grid[p]) for p in law.params]), len(law.params))
  x = np.full((5, len(law.covariates)), 3.0)
  out = _log_loss(law, grid[0], x)
  assert out.shape == (5,)
  assert len(law.published(grid[0])) >= len(law.params)


def test_kaplan_at_its_published_parameters():
  p = kaplan.KAPLAN_PUBLISHED
  theta = np.array([np.log(p["N_c"]), np.log(p["D_c"]), p["alpha_N"], p["alpha_D"]])
  n, d = 1e9, 1e10
  expected = ((p["N_c"] / n) ** (p["alpha_N"] / p["alpha_D"]) + p["D_c"] / d) ** p["alpha_D"]
  np.testing.assert_allclose(np.exp(_log_loss(kaplan.KAPLAN, theta, [[n, d]])), [expected], rtol=1e-12)
  assert kaplan.KAPLAN.published(theta) == pytest.approx(p)


def test_bivariate_reference_rescales_alpha_only():
  theta = np.array([0.2, 0.3, 0.5, 0.1])
  x = np.array([[3e7, 2e8], [1e9, 5e7]])
  other = bivariate.bivariate_law(1e7, 1e9)
  shifted = theta.copy()
  shifted[0] += 0.3 * np.log(1e8 / 1e7) + 0.5 * np.log(1e8 / 1e9)
  np.testing.assert_allclose(_log_loss(other, shifted, x), _log_loss(bivariate.BIVARIATE, theta, x), rtol=1e-12)
  with pytest.raises(ValueError, match="positive"):
    bivariate.bivariate_law(0.0, 1e8)


def test_data_constrained_matches_the_published_examples():
  # The upstream README's examples (the data's README): L(6.34e9, 242e9, 25e9), L(8.67e9, 178e9, 25e9).
  x = np.array([[6.34e9, 242e9, 25e9], [8.67e9, 178e9, 25e9]])
  full = np.exp(_log_loss(data_constrained.DATA_CONSTRAINED, data_constrained.MUENNIGHOFF_THETA, x))
  frozen = np.exp(_log_loss(data_constrained.MUENNIGHOFF_DECAY, data_constrained.MUENNIGHOFF_THETA[5:], x))
  np.testing.assert_allclose(full, [2.22564, 2.22696], atol=1e-5)
  np.testing.assert_allclose(frozen, full, rtol=1e-14)


def test_data_constrained_without_repetition_is_chinchilla():
  theta = data_constrained.MUENNIGHOFF_THETA
  x = np.array([[1e8, 2e10, 2e10], [1e8, 5e9, 5e9]])  # one epoch, N below N_opt(U_D) ≈ 0.05 U_D: no decay
  chinchilla = _log_loss(scaling.CHINCHILLA, theta[:5], x[:, :2])
  np.testing.assert_allclose(_log_loss(data_constrained.DATA_CONSTRAINED, theta, x), chinchilla, rtol=1e-14)
  with pytest.raises(ValueError, match="missing"):
    data_constrained.data_constrained_law({"a": 1.0})


def test_overtraining_is_tied_chinchilla_in_c_and_m():
  log_a, log_b, e, eta = 6.0, 7.0, 0.5, 0.15
  n, d = np.array([1e8, 7e9]), np.array([2e9, 1.4e11])
  x = overtraining.overtraining_covariates(n, d)
  big_a, big_b = np.exp(log_a) * 6.0 ** -eta, np.exp(log_b) * 6.0 ** -eta
  expected = np.exp(e) + big_a * n ** (-2 * eta) + big_b * d ** (-2 * eta)
  np.testing.assert_allclose(np.exp(_log_loss(overtraining.OVERTRAINING, [log_a, log_b, e, eta], x)), expected,
                             rtol=1e-12)
  with pytest.raises(ValueError, match="positive"):
    overtraining.overtraining_covariates([1e8, -1.0], [1e9, 1e9])


# ---- learning-rate schedule laws ----

def _schedules(peak=3e-3, total=800, warmup=50):
  s = np.arange(1, total + 1, dtype=np.float64)
  warm = peak * s / warmup
  constant = np.where(s <= warmup, warm, peak)
  cosine = np.where(s <= warmup, warm, 0.1 * peak + 0.45 * peak * (1 + np.cos(np.pi * (s - warmup) / (total - warmup))))
  step = np.where(s <= warmup, warm, np.where(s < 400, peak, 0.3 * peak))
  linear = np.where(s <= warmup, warm, peak - 0.9 * peak * np.clip((s - 600) / 200, 0, 1))
  return [constant, cosine, step, linear[:700]]  # the last one shorter: lengths may differ


def _points(lengths, every=25, first=60):
  return np.array([(c, s) for c, n in enumerate(lengths) for s in range(first, n + 1, every)], np.float64)


def _mpl_reference(theta, lr, step, warmup):
  """The multi-power law written as a plain sum over steps, for one point."""
  l0, a, alpha, b, c, beta, gamma = np.exp(theta[0]), np.exp(theta[1]), theta[2], np.exp(theta[3]), \
      np.exp(theta[4]), theta[5], theta[6]
  eta = np.concatenate([[0.0], lr])  # eta[j] = LR of step j, eta[0] = 0
  ld = 0.0
  for j in range(max(warmup, 0) + 1, step + 1):
    s_j = eta[j:step + 1].sum()
    ld += (eta[j - 1] - eta[j]) * (1 - (c * eta[j] ** -gamma * s_j + 1) ** -beta)
  return l0 + a * eta[1:step + 1].sum() ** -alpha - b * ld


def _annealing_reference(theta, lr, step, warmup, decay):
  l0, a, alpha, c = np.exp(theta[0]), np.exp(theta[1]), theta[2], np.exp(theta[3])
  eta = np.concatenate([[0.0], lr])
  m = s2 = 0.0
  for i in range(1, step + 1):
    m = decay * m + ((eta[i - 1] - eta[i]) if i > warmup else 0.0)
    s2 += m
  return l0 + a * eta[1:step + 1].sum() ** -alpha - c * s2


MPL_THETA = np.array([np.log(2.8), np.log(0.5), 0.5, np.log(100.0), np.log(2.0), 0.6, 0.6])


@pytest.mark.parametrize("warmup,bin_steps", [(0, 1), (50, 1), (0, 4), (50, 4)])
def test_multi_power_law_matches_a_plain_sum(warmup, bin_steps):
  schedules = _schedules()
  law = lr_schedule.multi_power_law(schedules, warmup, bin_steps=bin_steps)
  x = _points([len(s) for s in schedules], every=97, first=3)
  got = np.exp(_log_loss(law, MPL_THETA, x))
  want = [_mpl_reference(MPL_THETA, schedules[int(c)], int(s), warmup) for c, s in x]
  if bin_steps == 1:
    np.testing.assert_allclose(got, want, rtol=1e-12)
  else:  # merged old drops: a second-order error in the bin width, small next to the drop term (~0.25 nats)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got - want).max() > 0  # binning is in effect


@pytest.mark.parametrize("warmup", [0, 50])
def test_lr_annealing_law_matches_a_plain_recursion(warmup):
  schedules = _schedules()
  law = lr_schedule.lr_annealing_law(schedules, warmup, decay=0.99)
  theta = np.array([np.log(2.8), np.log(0.5), 0.5, np.log(0.5)])
  x = _points([len(s) for s in schedules], every=97, first=3)
  want = [_annealing_reference(theta, schedules[int(c)], int(s), warmup, 0.99) for c, s in x]
  np.testing.assert_allclose(np.exp(_log_loss(law, theta, x)), want, rtol=1e-12)


def test_multi_power_law_recovers_random_true_parameters():
  rng = np.random.default_rng(7)
  truth = np.array([np.log(rng.uniform(2.5, 3.2)), np.log(rng.uniform(0.4, 0.7)), rng.uniform(0.4, 0.6),
                    np.log(rng.uniform(60, 150)), np.log(rng.uniform(1.0, 3.0)), rng.uniform(0.4, 0.7),
                    rng.uniform(0.5, 0.7)])
  schedules = _schedules()
  law = lr_schedule.multi_power_law(schedules, 50, bin_steps=8)
  x = _points(law.lengths, every=20)
  loss = _noisy(law, truth, x, rng, noise=1e-4)
  result = scaling.fit(law, x, loss, init=law.init_grid()[::4], max_iter=1000)
  np.testing.assert_allclose(_log_loss(law, result.theta, x), _log_loss(law, truth, x), atol=3e-4)
  # the drop term's shape (C, β, γ) is the least determined part
  _assert_close(result.theta, truth, [0.01, 0.02, 0.02, 0.05, 0.2, 0.08, 0.03], str(result.params))


def test_lr_annealing_law_recovers_random_true_parameters():
  rng = np.random.default_rng(8)
  truth = np.array([np.log(rng.uniform(2.5, 3.2)), np.log(rng.uniform(0.4, 0.7)), rng.uniform(0.4, 0.6),
                    np.log(rng.uniform(0.2, 1.0))])
  law = lr_schedule.lr_annealing_law(_schedules(), 50)
  x = _points(law.lengths, every=20)
  result = scaling.fit(law, x, _noisy(law, truth, x, rng, noise=1e-4), init=law.init_grid()[::2])
  _assert_close(result.theta, truth, [0.005, 0.01, 0.005, 0.01], str(result.params))


def test_schedule_law_covariates():
  law = lr_schedule.multi_power_law(_schedules(), 50)
  assert law.covariates == ("curve", "step")
  law.validate_covariates(np.array([[0.0, 1.0], [3.0, 700.0]]))  # curve 0 and each curve's last step are valid
  for bad, match in [([[0.0, 0.0]], "steps"), ([[3.0, 701.0]], "steps"), ([[4.0, 5.0]], "curve indices"),
                     ([[-1.0, 5.0]], "curve indices"), ([[0.5, 5.0]], "integers")]:
    with pytest.raises(ValueError, match=match):
      law.validate_covariates(np.array(bad))
  with pytest.raises(ValueError, match="covariates|steps"):
    scaling.fit(law, np.array([[0.0, 0.0]] * 8), np.ones(8) * 3.0)


@pytest.mark.parametrize("make,match", [
    (lambda: lr_schedule.multi_power_law([]), "non-empty"),
    (lambda: lr_schedule.multi_power_law([np.array([0.0, 1e-3])]), "first LR"),
    (lambda: lr_schedule.multi_power_law([np.array([1e-3, -1e-3])]), "non-negative"),
    (lambda: lr_schedule.multi_power_law([np.ones(10)], 10), "warmup_steps"),
    (lambda: lr_schedule.multi_power_law([np.ones(10)], bin_steps=0), "bin_steps"),
    (lambda: lr_schedule.lr_annealing_law([np.ones(10)], decay=1.0), "decay"),
])
def test_schedule_law_bad_input(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_published_multi_power_fit_explains_the_25m_curves():
  curves = datasets.load_luo_curves(str(LUO), 25)
  names = sorted(curves)
  law = lr_schedule.multi_power_law([datasets.luo_lr_schedule(n) for n in names], 0)
  x = np.concatenate([np.stack([np.full(len(curves[n].steps), i), curves[n].steps], 1)[::3]
                      for i, n in enumerate(names)]).astype(np.float64)
  loss = np.concatenate([curves[n].loss[::3] for n in names])
  published = dict(L0=3.04045406, A=0.52468604, alpha=0.50786857, B=363.78751622, C=2.06560812, beta=0.58279013,
                   gamma=0.64142257)  # the data's README, 25M, R² = 0.9988
  pred = np.exp(_log_loss(law, lr_schedule.multi_power_theta(published), x))
  r2 = 1 - np.sum((pred - loss) ** 2) / np.sum((loss - loss.mean()) ** 2)
  assert r2 == pytest.approx(0.9988, abs=1e-3)
