"""Plots: each writes a non-empty PNG at the path it returns; bad input raises before anything is drawn."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import matplotlib  # noqa: F401  (the test extra installs it: these tests run in CI, never skip)

from cce_jax import scaling
from cce_jax.scaling import allocation
from cce_jax.scaling import isoflop
from cce_jax.scaling import laws
from cce_jax.scaling import plots

THETA = np.array([6.0, 7.5, 0.5, 0.34, 0.37])
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(n_points=40, seed=0):
  rng = np.random.default_rng(seed)
  x = np.stack([10 ** rng.uniform(7.5, 10, n_points), 10 ** rng.uniform(9, 11.5, n_points)], axis=1)
  p = scaling.CHINCHILLA.published(THETA)
  loss = p["E"] + p["A"] / x[:, 0] ** p["alpha"] + p["B"] / x[:, 1] ** p["beta"]
  return x, loss * np.exp(0.01 * rng.standard_normal(n_points))


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  return head == PNG_MAGIC


@pytest.mark.parametrize("against,color_by", [("compute", None), ("compute", "D"), ("N", "D"), ("D", None)])
def test_law_fit_plot(tmp_path, against, color_by):
  x, loss = _data()
  path = plots.plot_law_fit(scaling.CHINCHILLA, THETA, x, loss, tmp_path / "sub" / "fit.png", against=against,
                            color_by=color_by)
  assert path == str(tmp_path / "sub" / "fit.png")
  assert _is_png(path)


def test_one_covariate_law_gets_one_curve(tmp_path):
  law = laws.Law(name="power", params=("log_a", "alpha"), covariates=("N",),
                 log_loss=lambda theta, x: theta[0] - theta[1] * jnp.log(x[:, 0]), published=dict, grid={})
  n = np.geomspace(1e6, 1e9, 12)
  path = plots.plot_law_fit(law, np.array([3.0, 0.1]), n[:, None], np.exp(3.0 - 0.1 * np.log(n)),
                            tmp_path / "one.png", against="N")
  assert _is_png(path)
  with pytest.raises(ValueError, match="color_by must be one of \\[\\]"):
    plots.plot_law_fit(law, np.array([3.0, 0.1]), n[:, None], np.ones(12), tmp_path / "x.png", against="N",
                       color_by="D")


def test_isoflop_and_frontier_plots(tmp_path):
  p = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
  budgets = np.logspace(18, 20, 3)
  n_opt, _ = allocation.chinchilla_optimum(p, budgets)
  n = np.concatenate([c * np.geomspace(0.3, 3, 5) for c in n_opt])
  c = np.repeat(budgets, 5)
  loss = p["E"] + p["A"] / n ** p["alpha"] + p["B"] / (c / (6 * n)) ** p["beta"]
  result = isoflop.isoflop_fit(n, c, loss)
  assert _is_png(plots.plot_isoflop(result, str(tmp_path / "iso.png")))
  grid = np.logspace(18, 24, 20)
  exponents = 0.45 + 0.02 * np.random.default_rng(0).standard_normal((30, 1))
  draws = n_opt[0] / budgets[0] ** 0.45 * grid[None] ** exponents
  path = plots.plot_frontier(grid, allocation.chinchilla_optimum(p, grid)[0], tmp_path / "frontier.png", draws=draws,
                             minima=(result.compute, result.n_opt))
  assert _is_png(path)
  assert _is_png(plots.plot_frontier(grid, grid ** 0.5, tmp_path / "plain.png"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(path="fit.pdf"), r"\.png"),
    (dict(theta=np.zeros(4)), "theta must have shape"),
    (dict(x=np.ones((3, 3))), r"x must be \[points, 2\]"),
    (dict(against="C"), "against must be"),
    (dict(against="N", color_by="N"), "color_by must be one of"),
    (dict(loss=-np.ones(40)), "positive"),
    (dict(x=np.concatenate([np.zeros((40, 1)), np.ones((40, 1))], axis=1)), r"covariates \['D', 'N'\] must be"),
    (dict(curves=-1), "curves"),
])
def test_law_fit_plot_bad_input(tmp_path, kwargs, match):
  x, loss = _data()
  args = dict(theta=THETA, x=x, loss=loss, path=str(tmp_path / "fit.png"))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    plots.plot_law_fit(scaling.CHINCHILLA, args.pop("theta"), args.pop("x"), args.pop("loss"), args.pop("path"),
                       **args)
  assert not (tmp_path / "fit.png").exists()


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_opt=np.ones(3)), "same length"),
    (dict(draws=np.ones((5, 4))), r"draws must have shape \[K >= 2, 5\]"),
    (dict(draws=np.full((5, 5), np.nan)), "at least 2 rows"),
    (dict(level=1.5), "level"),
    (dict(minima=(np.ones(2), np.ones(3))), "minima"),
    (dict(compute=-np.ones(5)), "positive"),
])
def test_frontier_bad_input(tmp_path, kwargs, match):
  args = dict(compute=np.logspace(18, 22, 5), n_opt=np.logspace(8, 10, 5), path=str(tmp_path / "f.png"))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    plots.plot_frontier(args.pop("compute"), args.pop("n_opt"), args.pop("path"), **args)


def test_isoflop_plot_bad_input(tmp_path):
  with pytest.raises(ValueError, match="IsoFlopResult"):
    plots.plot_isoflop({"a": 0.5}, tmp_path / "iso.png")
