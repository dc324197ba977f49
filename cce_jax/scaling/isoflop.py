"""Chinchilla Approach 2 (IsoFLOP profiles): a parabola in log N per compute budget, power laws through the minima.

Points are grouped by compute budget C_g. Within a budget the loss is fitted as a parabola in u = ln N by weighted
least squares,
  L(u) ≈ c2 u² + c1 u + c0,   u*_g = −c1 / (2 c2)   (a minimum needs c2 > 0),
giving N*_g = exp(u*_g), D*_g = C_g / (6 N*_g) and L*_g = L(u*_g). Power laws through the minima,
  ln N* = ln k_N + a ln C,   ln D* = ln k_D + b ln C,
are fitted by (weighted) least squares (Hoffmann et al. 2022, §3.2). For L = E + A N^−α + B D^−β with C = 6 N D the
exponents are a = β/(α+β) and b = α/(α+β), so a + b = 1. Standard errors come from the log-log regression's residual
variance (no bootstrap); they need at least three budgets.

A parabola is a second-order expansion around the minimum: keep the sampled N near it (`window`) when the IsoFLOP
curves are wide or asymmetric, and keep budgets whose lowest loss is at an end of the sampled N out of the power law
(`require_interior`), since their minimum is not bracketed.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def compute_of(x) -> np.ndarray:
  """C = 6 N D [points] from x [points, 2] = (N, D) (the Kaplan / Hoffmann training-FLOP estimate)."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[1] != 2:
    raise ValueError(f"x must have shape [points, 2] (N, D), got {x.shape}")
  return 6.0 * x[:, 0] * x[:, 1]


def group_budgets(compute, *, log10_tolerance: float = 1e-6):
  """(labels [points] int, budgets [G]): points whose log10 C lie within `log10_tolerance` of their sorted neighbour
  share a budget (chained); a budget's value is the geometric mean of its points' C, and labels index budgets in
  increasing order."""
  compute = np.asarray(compute, np.float64)
  if compute.ndim != 1 or compute.size == 0:
    raise ValueError(f"compute must be a non-empty 1-D array, got shape {compute.shape}")
  if not np.isfinite(compute).all() or (compute <= 0).any():
    raise ValueError("compute budgets must be finite and positive")
  if log10_tolerance < 0:
    raise ValueError(f"log10_tolerance must be >= 0, got {log10_tolerance}")
  log_c = np.log10(compute)
  order = np.argsort(log_c, kind="stable")
  starts = np.concatenate([[True], np.diff(log_c[order]) > log10_tolerance])
  labels = np.empty(compute.size, np.int64)
  labels[order] = np.cumsum(starts) - 1
  groups = [compute[labels == g] for g in range(labels.max() + 1)]
  budgets = np.array([c[0] if (c == c[0]).all() else np.exp(np.log(c).mean()) for c in groups])
  return labels, budgets


def fit_parabola(n, loss, weights=None) -> np.ndarray:
  """(c2, c1, c0) of the weighted least-squares parabola L ≈ c2 u² + c1 u + c0 in u = ln N.

  n, loss, weights: [points] (weights default to ones). Raises ValueError for fewer than 3 points or distinct N, and
  when the parabola has no minimum (c2 <= 0).
  """
  n, loss, w = _check_points(n, loss, weights)
  u = np.log(n)
  if np.unique(u).size < 3:
    raise ValueError(f"a parabola needs at least 3 distinct model sizes, got {np.unique(u).size}")
  center = u.mean()
  t = u - center
  sw = np.sqrt(w)
  design = np.stack([t * t, t, np.ones_like(t)], axis=1)
  (q2, q1, q0), *_ = np.linalg.lstsq(design * sw[:, None], loss * sw, rcond=None)
  if not q2 > 0:
    raise ValueError(f"the fitted parabola opens downwards (curvature {q2:.3g}): no minimum in log N")
  # Back from t = u − center to u.
  return np.array([q2, q1 - 2 * q2 * center, q2 * center * center - q1 * center + q0])


def _check_points(n, loss, weights):
  n = np.asarray(n, np.float64)
  loss = np.asarray(loss, np.float64)
  if n.ndim != 1 or loss.shape != n.shape:
    raise ValueError(f"n and loss must be 1-D and of the same length, got {n.shape} and {loss.shape}")
  if n.size < 3:
    raise ValueError(f"a parabola needs at least 3 points, got {n.size}")
  if not (np.isfinite(n).all() and np.isfinite(loss).all()):
    raise ValueError("n and loss must be finite")
  if (n <= 0).any():
    raise ValueError("model sizes N must be positive")
  w = np.ones_like(n) if weights is None else np.asarray(weights, np.float64)
  if w.shape != n.shape or not np.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
    raise ValueError("weights must be finite, non-negative, one per point and not all zero")
  return n, loss, w


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = coefficient · C^exponent, fitted as ln y = ln coefficient + exponent · ln C.

  exponent_se, log_coefficient_se: standard errors from the regression (NaN with fewer than 3 budgets);
  r2: the (weighted) coefficient of determination in log space.
  """

  exponent: float
  coefficient: float
  exponent_se: float
  log_coefficient_se: float
  r2: float

  def __call__(self, compute) -> np.ndarray:
    return self.coefficient * np.asarray(compute, np.float64) ** self.exponent


def fit_power_law(compute, y, *, weights=None) -> PowerLaw:
  """Weighted least squares of ln y on ln C (compute, y, weights: [G], positive).

  Minimises Σ_g w_g (ln y_g − p0 − p1 ln C_g)²; the covariance of (p0, p1) is s² (XᵀWX)⁻¹ with
  s² = Σ_g w_g r_g² / (G − 2) (weights are relative, as in ordinary WLS).
  """
  compute = np.asarray(compute, np.float64)
  y = np.asarray(y, np.float64)
  if compute.ndim != 1 or y.shape != compute.shape:
    raise ValueError(f"compute and y must be 1-D and of the same length, got {compute.shape} and {y.shape}")
  if not (np.isfinite(compute).all() and np.isfinite(y).all()) or (compute <= 0).any() or (y <= 0).any():
    raise ValueError("compute and y must be finite and positive (the fit is in log-log space)")
  if np.unique(compute).size < 2:
    raise ValueError(f"a power law needs at least 2 distinct budgets, got {np.unique(compute).size}")
  w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
  if w.shape != y.shape or not np.isfinite(w).all() or (w <= 0).any():
    raise ValueError("power-law weights must be finite, positive, one per budget")
  x, t = np.log(compute), np.log(y)
  design = np.stack([np.ones_like(x), x], axis=1)
  gram = design.T @ (design * w[:, None])
  p = np.linalg.solve(gram, design.T @ (w * t))
  resid = t - design @ p
  dof = len(t) - 2
  if dof > 0:
    cov = (w @ (resid * resid) / dof) * np.linalg.inv(gram)
    log_coef_se, exp_se = np.sqrt(np.diag(cov))
  else:
    log_coef_se = exp_se = float("nan")
  t_bar = w @ t / w.sum()
  sst = w @ ((t - t_bar) ** 2)
  r2 = 1.0 - (w @ (resid * resid)) / sst if sst > 0 else float("nan")
  return PowerLaw(exponent=float(p[1]), coefficient=float(np.exp(p[0])), exponent_se=float(exp_se),
                  log_coefficient_se=float(log_coef_se), r2=float(r2))


@dataclasses.dataclass(frozen=True)
class IsoFlopBudget:
  """One budget's profile: the points used (n, loss [M]), the parabola coef (c2, c1, c0) in ln N, and its minimum."""

  compute: float
  n: np.ndarray
  loss: np.ndarray
  coef: np.ndarray
  n_opt: float
  d_opt: float
  loss_opt: float


@dataclasses.dataclass(frozen=True)
class IsoFlopResult:
  """Per-budget minima and the power laws N*(C) = k_N C^a, D*(C) = k_D C^b through them.

  skipped: budgets left out of the power laws by `require_interior` (lowest loss at an end of the sampled N) or
    `skip_invalid` (too few points, no minimum).
  """

  budgets: tuple[IsoFlopBudget, ...]
  n_law: PowerLaw
  d_law: PowerLaw
  skipped: tuple[float, ...] = ()

  @property
  def a(self) -> float:
    """The exponent of N*(C)."""
    return self.n_law.exponent

  @property
  def b(self) -> float:
    """The exponent of D*(C)."""
    return self.d_law.exponent

  @property
  def compute(self) -> np.ndarray:
    return np.array([g.compute for g in self.budgets])

  @property
  def n_opt(self) -> np.ndarray:
    return np.array([g.n_opt for g in self.budgets])

  @property
  def d_opt(self) -> np.ndarray:
    return np.array([g.d_opt for g in self.budgets])

  @property
  def loss_opt(self) -> np.ndarray:
    return np.array([g.loss_opt for g in self.budgets])


def isoflop_fit(n, compute, loss, *, weights=None, window: int | None = None, require_interior: bool = False,
                skip_invalid: bool = False, log10_tolerance: float = 1e-6, power_weights=None) -> IsoFlopResult:
  """Chinchilla Approach 2 on points (n, compute, loss: [points]).

  Args:
    n, compute, loss: model size N, training compute C and final loss of each run.
    weights: [points] per-point weights of the parabola fits (default ones).
    window: keep only the `window` points on each side of a budget's lowest loss (in N order) for its parabola;
      None keeps every point.
    require_interior: leave out budgets whose lowest loss is at the smallest or largest N (recorded in `skipped`).
    skip_invalid: leave out (and record in `skipped`) budgets with fewer than 3 points or without a minimum
      instead of raising.
    log10_tolerance: points whose log10 C differ by at most this (chained) share a budget (`group_budgets`).
    power_weights: [budgets kept] weights of the log-log regressions (e.g. 1 / Var(ln N*)); default ones.

  Raises ValueError for a budget with fewer than 3 points (after `window`) or without a minimum (unless
  `skip_invalid`), or fewer than 2 budgets left.
  """
  n = np.asarray(n, np.float64)
  loss = np.asarray(loss, np.float64)
  compute = np.asarray(compute, np.float64)
  if not (n.ndim == 1 and n.shape == loss.shape == compute.shape):
    raise ValueError(f"n, compute and loss must be 1-D and of the same length, got {n.shape}, {compute.shape}, "
                     f"{loss.shape}")
  w = np.ones_like(n) if weights is None else np.asarray(weights, np.float64)
  if w.shape != n.shape:
    raise ValueError(f"weights must have shape {n.shape}, got {w.shape}")
  if window is not None and window < 1:
    raise ValueError(f"window must be a positive number of points, got {window}")
  labels, values = group_budgets(compute, log10_tolerance=log10_tolerance)
  budgets, skipped = [], []
  for g, c in enumerate(values):
    idx = np.flatnonzero(labels == g)
    idx = idx[np.argsort(n[idx], kind="stable")]
    if idx.size < 3:
      if skip_invalid:
        skipped.append(float(c))
        continue
      raise ValueError(f"budget C = {c:.4g} has {idx.size} point(s); a parabola needs at least 3")
    k = int(np.argmin(loss[idx]))
    if require_interior and n[idx[k]] in (n[idx[0]], n[idx[-1]]):
      skipped.append(float(c))
      continue
    if window is not None:
      idx = idx[max(k - window, 0):k + window + 1]
    try:
      if idx.size < 3:
        raise ValueError(f"it keeps {idx.size} point(s) in a window of {window}; a parabola needs 3")
      coef = fit_parabola(n[idx], loss[idx], w[idx])
    except ValueError as e:
      if skip_invalid:
        skipped.append(float(c))
        continue
      raise ValueError(f"budget C = {c:.4g}: {e}") from e
    u_opt = -coef[1] / (2 * coef[0])
    n_opt = float(np.exp(u_opt))
    budgets.append(IsoFlopBudget(compute=float(c), n=n[idx], loss=loss[idx], coef=coef, n_opt=n_opt,
                                 d_opt=float(c / (6.0 * n_opt)), loss_opt=float(np.polyval(coef, u_opt))))
  if len(budgets) < 2:
    raise ValueError(f"power laws through the minima need at least 2 budgets, got {len(budgets)}"
                     + (f" ({len(skipped)} skipped)" if skipped else ""))
  c = np.array([b.compute for b in budgets])
  n_law = fit_power_law(c, np.array([b.n_opt for b in budgets]), weights=power_weights)
  d_law = fit_power_law(c, np.array([b.d_opt for b in budgets]), weights=power_weights)
  return IsoFlopResult(budgets=tuple(budgets), n_law=n_law, d_law=d_law, skipped=tuple(skipped))
