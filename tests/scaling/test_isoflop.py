"""IsoFLOP (Chinchilla Approach 2): exponents recovered from synthetic Chinchilla IsoFLOP grids, regressions, errors."""

from __future__ import annotations

import numpy as np
import pytest

from cce_jax.scaling import allocation
from cce_jax.scaling import isoflop

HOFFMANN = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)


def _chinchilla_loss(p, n, d):
  return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _isoflop_grid(p, budgets, *, half_width_decades=0.6, sizes=9, drift=0.0):
  """Runs on IsoFLOP grids: `sizes` model sizes per budget, log-spaced around the true N_opt(C) (shifted by
  `drift` decades per decade of compute)."""
  n_opt, _ = allocation.chinchilla_optimum(p, budgets)
  n, c = [], []
  for k, (budget, center) in enumerate(zip(budgets, n_opt)):
    shift = drift * np.log10(budget / budgets[0])
    n.append(center * 10 ** (np.linspace(-half_width_decades, half_width_decades, sizes) + shift))
    c.append(np.full(sizes, budget))
  n, c = np.concatenate(n), np.concatenate(c)
  return n, c, _chinchilla_loss(p, n, c / (6 * n))


@pytest.mark.parametrize("params", [HOFFMANN, dict(A=482.0, B=2085.4, E=1.817, alpha=0.348, beta=0.366),
                                    dict(A=300.0, B=900.0, E=1.5, alpha=0.45, beta=0.25)])
def test_recovers_chinchilla_exponents_on_centred_grids(params):
  budgets = np.logspace(18, 21, 7)
  n, c, loss = _isoflop_grid(params, budgets)
  result = isoflop.isoflop_fit(n, c, loss)
  a_true = params["beta"] / (params["alpha"] + params["beta"])
  # On grids of constant relative width centred on N_opt, the parabola's bias in ln N* is the same at every budget,
  # so the exponents are exact (only the coefficient is biased).
  assert result.a == pytest.approx(a_true, abs=1e-6)
  assert result.b == pytest.approx(1 - a_true, abs=1e-6)
  assert len(result.budgets) == 7 and result.skipped == ()
  n_true, _ = allocation.chinchilla_optimum(params, budgets)
  np.testing.assert_allclose(result.n_opt, n_true, rtol=0.1)
  np.testing.assert_allclose(6 * result.n_opt * result.d_opt, budgets, rtol=1e-12)
  np.testing.assert_allclose(result.loss_opt, _chinchilla_loss(params, n_true, budgets / (6 * n_true)), rtol=2e-3)


def test_noisy_grids_give_exponents_within_their_standard_errors():
  rng = np.random.default_rng(0)
  budgets = np.logspace(18, 21, 9)
  n, c, loss = _isoflop_grid(HOFFMANN, budgets, half_width_decades=0.5)
  loss = loss * np.exp(2e-3 * rng.standard_normal(loss.shape))
  result = isoflop.isoflop_fit(n, c, loss)
  a_true = HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"])
  assert 0 < result.n_law.exponent_se < 0.05
  assert abs(result.a - a_true) < 4 * result.n_law.exponent_se
  assert result.n_law.r2 > 0.95


def test_drifting_grid_and_window():
  # Grids that drift off the optimum bias Approach 2; a window around each budget's lowest loss limits the bias.
  budgets = np.logspace(18, 21, 7)
  n, c, loss = _isoflop_grid(HOFFMANN, budgets, half_width_decades=1.0, sizes=13, drift=0.3)
  a_true = HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"])
  full = isoflop.isoflop_fit(n, c, loss)
  windowed = isoflop.isoflop_fit(n, c, loss, window=2)
  assert abs(full.a - a_true) > 0.01
  assert abs(windowed.a - a_true) < 2e-3
  assert all(3 <= len(b.n) <= 5 for b in windowed.budgets) and len(full.budgets[0].n) == 13


def test_require_interior_skips_unbracketed_budgets():
  budgets = np.logspace(18, 21, 4)
  n, c, loss = _isoflop_grid(HOFFMANN, budgets)
  # Move the last budget's grid entirely below its optimum: the lowest loss is at the largest N.
  last = c == budgets[-1]
  n[last] = n[last] / 30
  loss[last] = _chinchilla_loss(HOFFMANN, n[last], c[last] / (6 * n[last]))
  result = isoflop.isoflop_fit(n, c, loss, require_interior=True)
  assert result.skipped == (pytest.approx(budgets[-1]),)
  assert len(result.budgets) == 3


def test_fit_parabola_is_exact_on_a_parabola_and_honours_weights():
  u = np.linspace(15, 20, 6)
  coef = np.array([0.3, -10.5, 95.0])
  n = np.exp(u)
  np.testing.assert_allclose(isoflop.fit_parabola(n, np.polyval(coef, u)), coef, rtol=1e-8)
  # An outlier with zero weight does not move the fit.
  loss = np.polyval(coef, u)
  loss[2] += 5.0
  w = np.ones(6)
  w[2] = 0.0
  np.testing.assert_allclose(isoflop.fit_parabola(n, loss, w), coef, rtol=1e-8)


def test_power_law_recovers_its_exponent_and_needs_three_budgets_for_errors():
  c = np.logspace(18, 22, 5)
  law = isoflop.fit_power_law(c, 0.1 * c ** 0.51)
  assert law.exponent == pytest.approx(0.51, abs=1e-12)
  assert law.coefficient == pytest.approx(0.1, rel=1e-9)
  assert law.exponent_se == pytest.approx(0.0, abs=1e-9) and law.r2 == pytest.approx(1.0)
  np.testing.assert_allclose(law(c), 0.1 * c ** 0.51, rtol=1e-9)
  two = isoflop.fit_power_law(c[:2], c[:2] ** 0.5)
  assert np.isnan(two.exponent_se)


def test_power_law_standard_error_matches_the_textbook_formula():
  rng = np.random.default_rng(1)
  x = np.linspace(40, 50, 8)
  t = 2.0 + 0.5 * x + 0.05 * rng.standard_normal(8)
  law = isoflop.fit_power_law(np.exp(x), np.exp(t))
  resid = t - (np.log(law.coefficient) + law.exponent * x)
  se = np.sqrt(resid @ resid / 6 / ((x - x.mean()) @ (x - x.mean())))
  assert law.exponent_se == pytest.approx(se, rel=1e-9)


def test_group_budgets_chains_within_tolerance():
  c = np.array([1e18, 1.01e18, 3e18, 1e18, 2.98e18, 1e19])
  labels, budgets = isoflop.group_budgets(c, log10_tolerance=0.01)
  assert labels.tolist() == [0, 0, 1, 0, 1, 2]
  np.testing.assert_allclose(budgets, [(1e18 * 1.01e18 * 1e18) ** (1 / 3), np.sqrt(3e18 * 2.98e18), 1e19])
  labels, _ = isoflop.group_budgets(c)
  assert labels.max() == 4


@pytest.mark.parametrize("mutate,match", [
    (lambda n, c, l: (n[:-1], c[:-1], l[:-1]), "budget C = 1e\\+21 has 2 point"),
    (lambda n, c, l: (n[:3], c[:3], l[:3]), "at least 2 budgets"),
    (lambda n, c, l: (n, c, -l), "opens downwards"),
    (lambda n, c, l: (n, c, l[:-1]), "same length"),
    (lambda n, c, l: (n, np.where(c == c[0], -1.0, c), l), "finite and positive"),
    (lambda n, c, l: (np.where(c == c[0], 1e9, n), c, l), "3 distinct model sizes"),
])
def test_bad_input(mutate, match):
  n, c, loss = _isoflop_grid(HOFFMANN, np.array([1e20, 1e21]), sizes=3)
  with pytest.raises(ValueError, match=match):
    isoflop.isoflop_fit(*mutate(n, c, loss))


def test_bad_window_and_compute_shape():
  n, c, loss = _isoflop_grid(HOFFMANN, np.array([1e20, 1e21]), sizes=5)
  with pytest.raises(ValueError, match="window"):
    isoflop.isoflop_fit(n, c, loss, window=0)
  with pytest.raises(ValueError, match="window of 1"):
    isoflop.isoflop_fit(n[[0, 1, 2, 5, 6, 7]], c[[0, 1, 2, 5, 6, 7]], loss[[0, 1, 2, 5, 6, 7]], window=1)
  with pytest.raises(ValueError, match=r"\[points, 2\]"):
    isoflop.compute_of(np.ones((3, 3)))


def test_skip_invalid_records_budgets_instead_of_raising():
  budgets = np.logspace(18, 21, 4)
  n, c, loss = _isoflop_grid(HOFFMANN, budgets, sizes=5)
  loss[c == budgets[1]] *= -1  # no minimum at the second budget
  keep = ~((c == budgets[3]) & (np.arange(c.size) % 5 > 1))  # 2 points left at the last budget
  n, c, loss = n[keep], c[keep], loss[keep]
  with pytest.raises(ValueError, match="opens downwards"):
    isoflop.isoflop_fit(n, c, loss)
  result = isoflop.isoflop_fit(n, c, loss, skip_invalid=True)
  assert result.skipped == (pytest.approx(budgets[1]), pytest.approx(budgets[3]))
  np.testing.assert_allclose(result.compute, budgets[[0, 2]])
  drop = c == budgets[0]
  with pytest.raises(ValueError, match=r"at least 2 budgets, got 1 \(2 skipped\)"):
    isoflop.isoflop_fit(n[~drop], c[~drop], loss[~drop], skip_invalid=True)
