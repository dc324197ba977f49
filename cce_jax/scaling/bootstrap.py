"""Bootstrap confidence intervals for a fitted law: every draw refitted at once by the batched L-BFGS.

Kinds of draw (b = 1..B), each refitted from the full-data fit θ̂ (and optionally a few grid starts):
* "pairs": resample the points with replacement. A draw is a vector of multiplicities c_b [N] (Multinomial(N, 1/N))
  and is fitted with weights w · c_b, so every draw has the data's shape and all draws run as one batch.
* "gaussian" (parametric): log L*_i = log L̂_i + ε_i, ε_i ~ N(0, s²), where L̂ is the full-data fit and
  s² = Σ w r² / (Σ w − P) its residual variance (r = log L̂ − log L).
* "residuals" (parametric): log L*_i = log L̂_i − r_j, j drawn with replacement (probability ∝ w_j).

Intervals are percentile intervals over the draws that converged (the others are dropped and counted), for the
published parameters, derived quantities (a user function of the published dict; by default a = β/(α+β) and
b = α/(α+β), the exponents of N_opt ∝ C^a and D_opt ∝ C^b, when the law has α and β) and the compute-optimal
frontier N_opt(C), D_opt(C) (Chinchilla's closed form for laws with A, B, α, β; any `frontier` function otherwise).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from cce_jax.scaling import allocation
from cce_jax.scaling import fitting
from cce_jax.scaling.laws import Law

KINDS = ("pairs", "gaussian", "residuals")


def percentile_interval(samples, level: float) -> tuple[float, float]:
  """(lower, upper) percentiles enclosing `level` of the finite samples [B] (NaN, NaN when there are none)."""
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  samples = np.asarray(samples, np.float64)
  samples = samples[np.isfinite(samples)]
  if samples.size == 0:
    return float("nan"), float("nan")
  lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def chinchilla_exponents(params: dict) -> dict:
  """{"a": β/(α+β), "b": α/(α+β)}: the exponents of N_opt ∝ C^a and D_opt ∝ C^b under C = 6 N D."""
  alpha, beta = params["alpha"], params["beta"]
  return {"a": beta / (alpha + beta), "b": alpha / (alpha + beta)}


def _default_derived(params: dict):
  return chinchilla_exponents if {"alpha", "beta"} <= set(params) else None


def _default_frontier(params: dict):
  return allocation.chinchilla_optimum if {"A", "B", "alpha", "beta"} <= set(params) else None


@dataclasses.dataclass
class BootstrapResult:
  """Per-draw results ([B] arrays over all draws; intervals over the converged ones).

  kind, level, draws (B), failed (draws dropped: not converged or not finite); fit: the full-data FitResult;
  theta [B, P'] fit-space parameters of each draw (P' = P, or P + 1 with log σ for "huber_ml");
  objective [B]; converged [B] bool; params {published name (and "sigma" for "huber_ml") -> [B]};
  derived {name -> [B]}; estimate {name -> full-data value} for params and derived; intervals {name -> (lo, hi)};
  compute [C] budgets, n_opt / d_opt [B, C] (None without `compute`), frontier_estimate {"N_opt", "D_opt" -> [C]}
  and frontier_intervals {"N_opt", "D_opt" -> [2, C] (lower row, upper row)}.
  """
  kind: str
  level: float
  draws: int
  failed: int
  fit: fitting.FitResult
  theta: np.ndarray
  objective: np.ndarray
  converged: np.ndarray
  params: dict
  derived: dict
  estimate: dict
  intervals: dict
  compute: np.ndarray | None = None
  n_opt: np.ndarray | None = None
  d_opt: np.ndarray | None = None
  frontier_estimate: dict = dataclasses.field(default_factory=dict)
  frontier_intervals: dict = dataclasses.field(default_factory=dict)


def _published(law: Law, theta_P, estimator: str) -> dict:
  out = dict(law.published(theta_P[:len(law.params)]))
  if estimator == "huber_ml":
    out["sigma"] = float(np.exp(theta_P[len(law.params)]))
  return out


_DRAW_ERRORS = (ValueError, ZeroDivisionError, FloatingPointError, OverflowError)  # e.g. an exponent <= 0


def _frontier_of(frontier, params: dict, compute):
  try:
    n, d = frontier(params, compute)
    return np.asarray(n, np.float64), np.asarray(d, np.float64)
  except _DRAW_ERRORS:
    return np.full(compute.shape, np.nan), np.full(compute.shape, np.nan)


def _derived_of(derived, params: dict, names) -> dict:
  try:
    return {name: float(v) for name, v in derived(params).items()}
  except _DRAW_ERRORS:
    return dict.fromkeys(names, float("nan"))


def draw_data(kind: str, rng, log_l_hat, log_l, w, draws: int, n_params: int):
  """(log L [B, N], weights [B, N]) of `draws` bootstrap data sets (see the module docstring): pairs draws keep
  the observed log L, parametric draws keep the weights.

  log_l_hat: full-data fitted log-loss [N]; log_l: observed log-loss [N]; w: weights [N]."""
  n = len(log_l)
  if kind == "pairs":
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=draws)
    return np.broadcast_to(log_l, (draws, n)).copy(), w * counts
  r = log_l_hat - log_l
  if kind == "gaussian":
    dof = max(w.sum() - n_params, 1.0)
    scale = np.sqrt(np.sum(w * r * r) / dof)
    return log_l_hat + scale * rng.standard_normal((draws, n)), np.broadcast_to(w, (draws, n)).copy()
  j = rng.choice(n, size=(draws, n), p=w / w.sum())
  return log_l_hat - r[j], np.broadcast_to(w, (draws, n)).copy()


def bootstrap_fit(law: Law, x, loss, *, draws: int = 1000, kind: str = "pairs", level: float = 0.9,
                  seed: int = 0, weights=None, delta: float = 1e-3, reduction: str = "sum",
                  estimator: str = "huber", fit_result: fitting.FitResult | None = None, init=None,
                  extra_starts: int = 0, derived: Callable | None = None, compute=None,
                  frontier: Callable | None = None, max_iter: int = 1000, gtol: float = 1e-9,
                  chunk: int = 128) -> BootstrapResult:
  """Bootstraps the fit of `law` to (x [N, K], loss [N]); all draws are refitted in one batch.

  Args:
    law, x, loss, weights, delta, reduction, estimator: as in `fitting.fit`.
    draws: number of bootstrap data sets B. kind: "pairs", "gaussian" or "residuals" (module docstring).
    level: the intervals' coverage (0.9: 5th to 95th percentile). seed: seeds the draws.
    fit_result: the full-data fit (same law, data and options); fitted from `init` (default the law's grid)
      when None.
    extra_starts: grid starts (from `init` or the law's grid, the same for every draw) refitted besides θ̂;
      each draw keeps its best start.
    derived: params dict -> {name: float}, evaluated per draw (default: `chinchilla_exponents` when the law has
      alpha and beta).
    compute: budgets [C] (FLOP) for the frontier; frontier: (params dict, compute [C]) -> (N_opt [C], D_opt [C])
      (default: `allocation.chinchilla_optimum` when the law has A, B, alpha, beta).
    max_iter, gtol, chunk: see `fitting.lbfgs`.

  Returns:
    BootstrapResult.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if int(draws) != draws or draws < 2:
    raise ValueError(f"draws must be an integer >= 2, got {draws}")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if int(extra_starts) != extra_starts or extra_starts < 0:
    raise ValueError(f"extra_starts must be a non-negative integer, got {extra_starts}")
  delta = fitting.check_options(estimator, reduction, delta)
  x, loss, w = fitting.check_data(law, x, loss, weights)
  grid = fitting.check_init(law, init)
  if compute is not None:
    compute = np.atleast_1d(np.asarray(compute, np.float64))
    if compute.ndim != 1 or not np.isfinite(compute).all() or (compute <= 0).any():
      raise ValueError("compute budgets must be a 1-D array of finite positive values")
  if fit_result is None:
    fit_result = fitting.fit(law, x, loss, weights=w, delta=delta, reduction=reduction, init=grid,
                             estimator=estimator, max_iter=max_iter, gtol=gtol)
  elif (fit_result.law, fit_result.estimator) != (law.name, estimator) or fit_result.delta not in (None, delta):
    raise ValueError(f"fit_result is a {fit_result.estimator!r} fit (delta {fit_result.delta}) of {fit_result.law!r}, "
                     f"not a {estimator!r} fit (delta {delta}) of {law.name!r}")
  estimate = _published(law, _fit_space_theta(fit_result, estimator), estimator)
  derived = derived or _default_derived(estimate)
  if compute is not None:
    frontier = frontier or _default_frontier(estimate)
    if frontier is None:
      raise ValueError(f"law {law.name!r} has no closed-form frontier: pass frontier=(params, compute) -> (N, D)")

  rng = np.random.default_rng(seed)
  log_l = np.log(loss)
  log_l_hat = _log_loss(law, fit_result.theta, x)
  draw_log_l, draw_w = draw_data(kind, rng, log_l_hat, log_l, w, int(draws), len(law.params))
  starts = [_fit_space_theta(fit_result, estimator)[None]]
  if extra_starts:
    pick = grid[rng.choice(len(grid), size=min(extra_starts, len(grid)), replace=False)]
    starts.append(fitting.fit_space_starts(law, pick, estimator, x, log_l, delta))
  starts = np.concatenate(starts)  # [k, P']
  k = len(starts)
  theta0 = np.tile(starts, (int(draws), 1))  # draw b owns lanes b*k .. b*k + k - 1
  fun = fitting.lane_objective(law, delta, reduction, estimator)
  # Pairs draws differ only in their weights, parametric ones only in their losses: only those go per start.
  if kind == "pairs":
    args, per_start = (log_l, np.repeat(draw_w, k, 0), x), (False, True, False)
  else:
    args, per_start = (np.repeat(draw_log_l, k, 0), w, x), (True, False, False)
  out = fitting.lbfgs(fun, theta0, args, per_start=per_start, max_iter=max_iter, gtol=gtol, keep=None, chunk=chunk)

  values = np.where(np.isfinite(out.value), out.value, np.inf).reshape(int(draws), k)
  ok = fitting.converged_mask(values, out.grad_norm.reshape(int(draws), k), out.status.reshape(int(draws), k), gtol)
  best = np.array([max(fitting.select_best(v, o), 0) for v, o in zip(values, ok)])
  rows = np.arange(int(draws)) * k + best
  theta = out.theta[rows]
  objective = values[np.arange(int(draws)), best]
  converged = ok[np.arange(int(draws)), best] & np.isfinite(theta).all(axis=1)

  per_draw = [_published(law, t, estimator) for t in theta]
  params = {name: np.array([p[name] for p in per_draw], np.float64) for name in estimate}
  derived_draws, derived_estimate = {}, {}
  if derived is not None:
    derived_estimate = {name: float(v) for name, v in derived(estimate).items()}
    rows_d = [_derived_of(derived, p, derived_estimate) for p in per_draw]
    derived_draws = {name: np.array([r[name] for r in rows_d], np.float64) for name in derived_estimate}
  converged &= np.all([np.isfinite(v) for v in params.values()], axis=0)  # a draw that fails is dropped whole
  intervals = {name: percentile_interval(v[converged], level) for name, v in {**params, **derived_draws}.items()}

  result = BootstrapResult(
      kind=kind, level=level, draws=int(draws), failed=int((~converged).sum()), fit=fit_result, theta=theta,
      objective=objective, converged=converged, params=params, derived=derived_draws,
      estimate={**estimate, **derived_estimate}, intervals=intervals)
  if compute is not None:
    n_opt, d_opt = map(np.array, zip(*(_frontier_of(frontier, p, compute) for p in per_draw)))
    n_hat, d_hat = _frontier_of(frontier, estimate, compute)
    result.compute, result.n_opt, result.d_opt = compute, n_opt, d_opt
    result.frontier_estimate = {"N_opt": n_hat, "D_opt": d_hat}
    result.frontier_intervals = {
        name: np.array([percentile_interval(col, level) for col in arr[converged].T]).T
        for name, arr in (("N_opt", n_opt), ("D_opt", d_opt))}
  return result


def pairs_bootstrap(law: Law, x, loss, *, n_resamples: int = 1000, **kwargs) -> BootstrapResult:
  """`bootstrap_fit(law, x, loss, kind="pairs", draws=n_resamples, **kwargs)`."""
  return bootstrap_fit(law, x, loss, kind="pairs", draws=n_resamples, **kwargs)


def _fit_space_theta(fit_result: fitting.FitResult, estimator: str) -> np.ndarray:
  theta = np.asarray(fit_result.theta, np.float64)
  if estimator == "huber_ml":
    if fit_result.sigma is None:
      raise ValueError("a 'huber_ml' bootstrap needs a fit_result with sigma")
    theta = np.append(theta, np.log(fit_result.sigma))
  return theta


def _log_loss(law: Law, theta_P, x) -> np.ndarray:
  return np.asarray(fitting.log_loss_at(law, np.asarray(theta_P, np.float64)[None], x))[0]
