"""Figures for scaling-law fits (matplotlib, Agg backend): each function writes one PNG and returns its path.

* `plot_law_fit`: observed loss against compute C = 6 N D (or a covariate), coloured by another covariate, with the
  fitted law's curves at a few values of that covariate.
* `plot_isoflop`: IsoFLOP profiles (loss against N per budget), their fitted parabolas and minima.
* `plot_frontier`: the compute-optimal frontier N_opt(C), with a central band from bootstrap draws of N_opt(C).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.scaling.isoflop import IsoFlopResult
from cce_jax.scaling.laws import Law


def _pyplot():
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("plots need matplotlib: pip install 'cce_jax[plots]'") from e
  return plt


def _check_path(path) -> str:
  path = os.fspath(path)
  if not path.lower().endswith(".png"):
    raise ValueError(f"plots are written as PNG: the path must end in .png, got {path!r}")
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  return path


def _save(fig, plt, path) -> str:
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_law_fit(law: Law, theta, x, loss, path, *, against: str = "compute", color_by: str | None = None,
                 curves: int = 5, title: str | None = None) -> str:
  """Scatter of loss [points] against `against` ("compute" = 6 N D, or a covariate name), coloured by `color_by`
  (a covariate; default the first one not plotted), and the law's predictions along `curves` values of `color_by`
  (log-spaced over its range). Other covariates are held at their median. A law of one covariate gets one curve and
  no colours. x: [points, K]; the plotted covariates must be positive (logarithmic axes)."""
  theta = np.asarray(theta, np.float64)
  x = np.asarray(x, np.float64)
  loss = np.asarray(loss, np.float64)
  names = list(law.covariates)
  if theta.shape != (len(law.params),):
    raise ValueError(f"theta must have shape [{len(law.params)}] ({', '.join(law.params)}), got {theta.shape}")
  if x.ndim != 2 or x.shape[1] != len(names) or loss.shape != (x.shape[0],) or x.shape[0] == 0:
    raise ValueError(f"x must be [points, {len(names)}] ({', '.join(names)}) with one loss per row, got {x.shape} "
                     f"and {loss.shape}")
  if not (np.isfinite(x).all() and np.isfinite(loss).all()) or (loss <= 0).any():
    raise ValueError("x and loss must be finite and the losses positive")
  if against == "compute":
    if not {"N", "D"} <= set(names):
      raise ValueError(f"against='compute' needs covariates N and D; law {law.name!r} has {names}")
    options = ["N", "D"]
  elif against in names:
    options = [c for c in names if c != against]
  else:
    raise ValueError(f"against must be 'compute' or one of {names}, got {against!r}")
  if color_by is None:
    color_by = options[0] if options else None
  elif color_by not in options:
    raise ValueError(f"color_by must be one of {options} when plotting against {against!r}, got {color_by!r}")
  if curves < 0:
    raise ValueError(f"curves must be >= 0, got {curves}")
  k_color = None if color_by is None else names.index(color_by)
  if against == "compute":
    k_vary = names.index("D" if color_by == "N" else "N")
  else:
    k_vary = names.index(against)
  plotted = [k for k in (k_vary, k_color) if k is not None] + ([names.index("N"), names.index("D")]
                                                               if against == "compute" else [])
  if (x[:, plotted] <= 0).any():
    raise ValueError(f"the plotted covariates {sorted({names[k] for k in plotted})} must be positive "
                     "(the axes are logarithmic)")

  def horizontal(xs):
    return 6.0 * xs[:, names.index("N")] * xs[:, names.index("D")] if against == "compute" else xs[:, k_vary]

  path = _check_path(path)
  plt = _pyplot()
  from matplotlib.colors import LogNorm  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  center = np.median(x, axis=0)
  vary = np.geomspace(x[:, k_vary].min(), x[:, k_vary].max(), 200)

  def predict(grid):
    with jax.enable_x64(True):
      return np.exp(np.asarray(law.log_loss(jnp.asarray(theta), jnp.asarray(grid))))

  if k_color is None:
    ax.scatter(horizontal(x), loss, s=14, color="C0", edgecolors="k", linewidths=0.3, zorder=3, label="data")
    if curves:
      grid = np.tile(center, (vary.size, 1))
      grid[:, k_vary] = vary
      ax.plot(horizontal(grid), predict(grid), color="C1", lw=1.4, label="fitted law")
    ax.legend(fontsize=8)
  else:
    lo, hi = x[:, k_color].min(), x[:, k_color].max()
    norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 1.0001)
    sc = ax.scatter(horizontal(x), loss, c=x[:, k_color], cmap="viridis", norm=norm, s=14, edgecolors="k",
                    linewidths=0.3, zorder=3)
    for value in np.geomspace(lo, hi, curves) if curves else []:
      grid = np.tile(center, (vary.size, 1))
      grid[:, k_vary], grid[:, k_color] = vary, value
      ax.plot(horizontal(grid), predict(grid), color=plt.get_cmap("viridis")(norm(value)), lw=1.2)
    fig.colorbar(sc, ax=ax, label=color_by)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("compute C = 6ND (FLOP)" if against == "compute" else against)
  ax.set_ylabel("loss")
  ax.set_title(title or f"{law.name}: data and fitted law")
  ax.grid(alpha=0.3, which="both")
  return _save(fig, plt, path)


def plot_isoflop(result: IsoFlopResult, path, *, title: str | None = None) -> str:
  """Loss against N for each budget of an `isoflop.isoflop_fit` result, its parabola and its minimum (N*, L*)."""
  if not isinstance(result, IsoFlopResult) or not result.budgets:
    raise ValueError("plot_isoflop needs an IsoFlopResult with at least one budget (from isoflop.isoflop_fit)")
  path = _check_path(path)
  plt = _pyplot()
  from matplotlib.colors import LogNorm  # pylint: disable=import-outside-toplevel
  c = result.compute
  norm = LogNorm(vmin=c.min(), vmax=c.max() if c.max() > c.min() else c.min() * 1.0001)
  cmap = plt.get_cmap("plasma")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for budget in result.budgets:
    color = cmap(norm(budget.compute) * 0.85)
    ax.scatter(budget.n, budget.loss, color=color, s=14, zorder=3)
    u = np.linspace(np.log(budget.n.min()), np.log(budget.n.max()), 100)
    ax.plot(np.exp(u), np.polyval(budget.coef, u), color=color, lw=1.2, label=f"C = {budget.compute:.2g}")
    ax.plot(budget.n_opt, budget.loss_opt, marker="*", ms=11, color=color, markeredgecolor="k", zorder=4)
  ax.set_xscale("log")
  ax.set_xlabel("parameters N")
  ax.set_ylabel("loss")
  ax.set_title(title or f"IsoFLOP profiles: N* ∝ C^{result.a:.3f}, D* ∝ C^{result.b:.3f}")
  if len(result.budgets) <= 12:
    ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3, which="both")
  return _save(fig, plt, path)


def plot_frontier(compute, n_opt, path, *, draws=None, level: float = 0.95, minima=None,
                  label: str = "fitted N_opt(C)", title: str | None = None) -> str:
  """N_opt(C) [G] against compute [G] (log-log); with draws [K, G] of N_opt(C) (e.g. from bootstrap refits) the
  central `level` band between their percentiles; minima = (compute [M], N* [M]) adds points (e.g. IsoFLOP minima)."""
  compute = np.asarray(compute, np.float64)
  n_opt = np.asarray(n_opt, np.float64)
  if compute.ndim != 1 or n_opt.shape != compute.shape or compute.size < 2:
    raise ValueError(f"compute and n_opt must be 1-D, of the same length >= 2, got {compute.shape} and "
                     f"{n_opt.shape}")
  if not (np.isfinite(compute).all() and np.isfinite(n_opt).all()) or (compute <= 0).any() or (n_opt <= 0).any():
    raise ValueError("compute and n_opt must be finite and positive (the axes are logarithmic)")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if draws is not None:
    draws = np.asarray(draws, np.float64)
    if draws.ndim != 2 or draws.shape[1] != compute.size or draws.shape[0] < 2:
      raise ValueError(f"draws must have shape [K >= 2, {compute.size}] (one N_opt per budget per draw), got "
                       f"{draws.shape}")
    draws = draws[np.isfinite(draws).all(axis=1)]
    if draws.shape[0] < 2:
      raise ValueError("draws need at least 2 rows without NaN or infinite values")
  if minima is not None:
    minima = tuple(np.asarray(m, np.float64) for m in minima)
    if len(minima) != 2 or minima[0].shape != minima[1].shape or minima[0].ndim != 1:
      raise ValueError("minima must be a pair (compute [M], N* [M])")
  path = _check_path(path)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot(compute, n_opt, color="C0", lw=1.8, label=label)
  if draws is not None:
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)], axis=0)
    ax.fill_between(compute, lo, hi, color="C0", alpha=0.25, label=f"{100 * level:.0f}% band ({len(draws)} draws)")
  if minima is not None:
    ax.scatter(*minima, color="C3", s=18, zorder=3, label="IsoFLOP minima")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("compute C (FLOP)")
  ax.set_ylabel("compute-optimal parameters N_opt")
  ax.set_title(title or "compute-optimal frontier")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  return _save(fig, plt, path)
