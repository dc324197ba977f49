"""Fitting a law: Huber loss on log-loss residuals, batched multi-start L-BFGS in float64, best start kept.

Residuals r_i = log_loss(theta, x_i) − log L_i (fitting is on log L, Hoffmann et al.'s procedure). Estimators:

* "huber" (default): objective(theta) = Σ_i w_i · Huber_δ(r_i)   (reduction "sum"; δ = 1e-3 by default).
  Hoffmann et al. report a mean; Besiroglu et al. found that with the mean scipy's L-BFGS-B stops near its start
  (its relative-reduction test divides by max(|f|, 1) and the mean objective is ~5e-6), so "mean" warns. This
  fitter's gradient-norm test does not stop early there, but other optimisers and tolerances may.
* "huber_ml": maximum likelihood with a fitted residual scale σ (fit space: the law's parameters, then log σ).
  The residuals are modelled as i.i.d. draws of the Huber density with scale σ,
    p(r | σ) = exp(−Huber_δ(r / σ)) / (σ Z_δ),   Z_δ = √(2π) (2 Φ(δ) − 1) + (2 / δ) exp(−δ² / 2),
  (Gaussian for |r| <= δσ, exponential tails beyond; δ in units of σ), and the objective is the weighted negative
  log-likelihood Σ_i w_i [Huber_δ(r_i / σ) + log σ + log Z_δ]. With δ = 1e-3 (the default, as for "huber") the
  density is nearly Laplace with scale σ/δ (so σ ≈ δ · mean |r|), and on Epoch AI's 240 points this reproduces
  Besiroglu et al.'s published estimates (A 482.01, B 2085.43, E 1.82, α 0.3478, β 0.3658); δ ~ 1 (e.g. 1.345)
  makes σ a Gaussian-like residual scale.

The optimiser is `batched_lbfgs.lbfgs` (batched over starts; see there) or optax's L-BFGS (`method="optax"`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.scaling.laws import Law
from cce_jax.scaling.batched_lbfgs import CONVERGED
from cce_jax.scaling.batched_lbfgs import MAX_ITER
from cce_jax.scaling.batched_lbfgs import STALLED
from cce_jax.scaling.batched_lbfgs import STATUS_NAMES as STATUS_NAMES
from cce_jax.scaling.batched_lbfgs import LbfgsResult as LbfgsResult
from cce_jax.scaling.batched_lbfgs import lbfgs as lbfgs
from cce_jax.scaling.batched_lbfgs import minimize as minimize

ESTIMATORS = ("huber", "huber_ml")
METHODS = ("lbfgs", "optax")



def huber(r, delta):
  """Huber_δ(r): r²/2 for |r| <= δ, δ(|r| − δ/2) beyond."""
  a = jnp.abs(r)
  return jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_log_normalizer(delta: float) -> float:
  """log Z_δ, Z_δ = ∫ exp(−Huber_δ(u)) du = √(2π) (2Φ(δ) − 1) + (2/δ) exp(−δ²/2)."""
  if not delta > 0:
    raise ValueError(f"delta must be positive, got {delta}")
  return math.log(math.sqrt(2 * math.pi) * math.erf(delta / math.sqrt(2)) + 2.0 / delta * math.exp(-0.5 * delta**2))


def check_data(law: Law, x, loss, weights=None):
  """Validated float64 arrays (x [N, K], loss [N], weights [N]); clear errors for bad input."""
  x = np.asarray(x, np.float64)
  loss = np.asarray(loss, np.float64)
  if x.ndim == 1 and len(law.covariates) == 1:
    x = x[:, None]
  if x.ndim != 2 or x.shape[1] != len(law.covariates):
    raise ValueError(f"law {law.name!r} needs x of shape [points, {len(law.covariates)}] "
                     f"({', '.join(law.covariates)}), got {x.shape}")
  if loss.shape != (x.shape[0],):
    raise ValueError(f"loss must have shape [{x.shape[0]}] (one per row of x), got {loss.shape}")
  for name, arr in (("x", x), ("loss", loss)):
    if not np.isfinite(arr).all():
      raise ValueError(f"{name} contains NaN or infinite values")
  law.validate_covariates(x)
  if (loss <= 0).any():
    raise ValueError("losses must be positive (the fit is on log L)")
  if x.shape[0] < len(law.params):
    raise ValueError(f"law {law.name!r} has {len(law.params)} parameters: it needs at least that many points, "
                     f"got {x.shape[0]}")
  w = np.ones_like(loss) if weights is None else np.asarray(weights, np.float64)
  if w.shape != loss.shape or (w < 0).any() or not np.isfinite(w).all():
    raise ValueError("weights must be finite, non-negative, one per point")
  if not w.sum() > 0:
    raise ValueError("weights must not all be zero")
  return x, loss, w


def check_options(estimator: str, reduction: str, delta, method: str = "lbfgs") -> float:
  """Validates the estimator, reduction, δ and method; returns δ as a float."""
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  delta = float(delta)
  if not (np.isfinite(delta) and delta > 0):
    raise ValueError(f"delta must be finite and positive, got {delta}")
  return delta


def objective_fn(law: Law, x, log_l, w, delta, reduction):
  """objective(theta [P]) -> scalar: the Huber objective on fixed data (x [N, K], log L [N], weights [N])."""
  def objective(theta):
    total = jnp.sum(w * huber(law.log_loss(theta, x) - log_l, delta))
    return total / jnp.sum(w) if reduction == "mean" else total
  return objective


_LANE_OBJECTIVES: collections.OrderedDict = collections.OrderedDict()


def lane_objective(law: Law, delta: float, reduction: str, estimator: str) -> Callable:
  """fun(theta [P'], log_l [N], w [N], x [N, K]) -> scalar, the estimator's objective with data as arguments.

  P' = P for "huber", P + 1 (log σ last) for "huber_ml". The same function object is returned for the same
  (law, δ, reduction, estimator), so the jitted optimiser is reused across data sets of one shape."""
  key = (id(law), float(delta), reduction, estimator)
  hit = _LANE_OBJECTIVES.get(key)
  if hit is not None and hit[0] is law:
    _LANE_OBJECTIVES.move_to_end(key)
    return hit[1]
  n_params = len(law.params)
  log_z = huber_log_normalizer(delta) if estimator == "huber_ml" else 0.0

  def fun(theta, log_l, w, x):
    if estimator == "huber_ml":
      log_sigma = theta[n_params]
      r = law.log_loss(theta[:n_params], x) - log_l
      total = jnp.sum(w * (huber(r * jnp.exp(-log_sigma), delta) + log_sigma + log_z))
    else:
      total = jnp.sum(w * huber(law.log_loss(theta, x) - log_l, delta))
    return total / jnp.sum(w) if reduction == "mean" else total

  _LANE_OBJECTIVES[key] = (law, fun)
  while len(_LANE_OBJECTIVES) > 64:
    _LANE_OBJECTIVES.popitem(last=False)
  return fun


def converged_mask(values, grad_norms, status, gtol: float) -> np.ndarray:
  """Starts that converged [S]: a finite objective, and either stopped as converged or stalled (their line search
  or their progress could no longer lower the objective in float64: a minimum to rounding, even where the
  objective has kinks finer than that, as a nearly-Laplace likelihood does) or have a gradient norm
  <= max(gtol, 1e-6) · max(1, |objective|). Pruned starts and starts stopped at max_iter did not converge."""
  values, grad_norms, status = np.asarray(values), np.asarray(grad_norms), np.asarray(status)
  with np.errstate(invalid="ignore"):
    small = grad_norms <= max(gtol, 1e-6) * np.maximum(1.0, np.abs(values))
  return np.isfinite(values) & ((status == CONVERGED) | (status == STALLED) | small)


def select_best(values, ok, rtol: float = 1e-9) -> int:
  """Index of the best start: the lowest finite objective; a converged start (ok) instead when its objective is
  within rtol of that lowest one. A converged start on a plateau never beats a lower objective. -1 if none finite."""
  values = np.where(np.isfinite(values), values, np.inf)
  if not np.isfinite(values).any():
    return -1
  lowest = int(np.argmin(values))
  close = ok & (values <= values[lowest] + rtol * abs(values[lowest]))
  return int(np.flatnonzero(close)[np.argmin(values[close])]) if close.any() and not ok[lowest] else lowest


_LOG_LOSS: collections.OrderedDict = collections.OrderedDict()


def log_loss_at(law: Law, theta_SxP, x) -> np.ndarray:
  """law.log_loss for each row of theta [S, P] on x [N, K]: float64 [S, N] (jitted once per law and shape)."""
  key = id(law)
  hit = _LOG_LOSS.get(key)
  if hit is None or hit[0] is not law:
    hit = _LOG_LOSS[key] = (law, jax.jit(jax.vmap(law.log_loss, in_axes=(0, None))))
    while len(_LOG_LOSS) > 64:
      _LOG_LOSS.popitem(last=False)
  with jax.enable_x64(True):
    return np.asarray(hit[1](jnp.asarray(theta_SxP, jnp.float64), jnp.asarray(x, jnp.float64)))


def predict_loss(law: Law, theta_P, x) -> np.ndarray:
  """exp(law.log_loss(theta, x)): predicted losses [N] (float64) at fit-space theta [P] for x [N, K]."""
  return np.exp(log_loss_at(law, np.asarray(theta_P, np.float64)[None], x)[0])


def r_squared(pred, target) -> float:
  """1 − Σ(pred − target)² / Σ(target − mean target)², on the losses themselves (float64)."""
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  return float(1.0 - np.sum((pred - target) ** 2) / np.sum((target - target.mean()) ** 2))


def initial_log_sigma(law: Law, theta_SxP, x, log_l, delta: float) -> np.ndarray:
  """[S] huber_ml's start for log σ at each start: log of min(1, δ) · 1.4826 · median |r| (a robust residual scale;
  for small δ the density is nearly Laplace and its σ is about δ · mean |r|), clipped to [1e-12, 1e6]."""
  with np.errstate(invalid="ignore", over="ignore"):
    scale = 1.4826 * np.median(np.abs(log_loss_at(law, theta_SxP, x) - np.asarray(log_l)), axis=-1)
  return np.log(np.clip(min(1.0, delta) * np.where(np.isfinite(scale), scale, 1.0), 1e-12, 1e6))


@dataclasses.dataclass
class FitResult:
  law: str
  params: dict  # published names -> values
  theta: np.ndarray  # fit-space parameters of the best start [P] (the law's, without log σ)
  objective: float
  grad_norm: float
  converged: bool
  starts: int
  converged_starts: int
  iterations: int
  estimator: str = "huber"
  sigma: float | None = None  # the fitted residual scale σ ("huber_ml")
  delta: float | None = None  # the Huber threshold used
  evaluations: int = 0  # objective evaluations, all starts together
  status_counts: dict = dataclasses.field(default_factory=dict)  # STATUS_NAMES -> number of starts


def check_init(law: Law, init) -> np.ndarray:
  """Starts [S, P] as float64 (default: the law's grid); ValueError when the shape or values are bad."""
  init = law.init_grid() if init is None else np.atleast_2d(np.asarray(init, np.float64))
  if init.ndim != 2 or init.shape[1] != len(law.params) or init.shape[0] == 0:
    raise ValueError(f"init must have {len(law.params)} columns ({', '.join(law.params)}), got {init.shape}")
  if not np.isfinite(init).all():
    raise ValueError("init contains NaN or infinite values")
  return init


def fit_space_starts(law: Law, init_SxP, estimator: str, x, log_l, delta: float) -> np.ndarray:
  """The optimiser's starts: init [S, P], with log σ appended (a robust scale of each start's residuals) for
  "huber_ml"."""
  if estimator != "huber_ml":
    return np.asarray(init_SxP, np.float64)
  return np.concatenate([init_SxP, initial_log_sigma(law, init_SxP, x, log_l, delta)[:, None]], axis=1)


def _optax_starts(fun, theta0_SxP, log_l, w, x, max_iter, gtol) -> LbfgsResult:
  with jax.enable_x64(True):
    args = (jnp.asarray(log_l), jnp.asarray(w), jnp.asarray(x))
    run = jax.jit(lambda t: minimize(lambda theta: fun(theta, *args), t, max_iter=max_iter, gtol=gtol))
    theta, value, gnorm, iters = (np.asarray(a) for a in run(jnp.asarray(theta0_SxP)))
  status = np.where(gnorm <= gtol, CONVERGED, MAX_ITER)
  return LbfgsResult(theta, value, gnorm, iters, iters, status)


def fit(law: Law, x, loss, *, weights=None, delta: float = 1e-3, reduction: str = "sum", init=None,
        max_iter: int = 1000, gtol: float = 1e-9, estimator: str = "huber", method: str = "lbfgs",
        keep: int | None = 64, history: int = 10, chunk: int = 32) -> FitResult:
  """Fits `law` to (x [N, K], loss [N]) from every start of `init` ([S, P]; default the law's grid).

  Args:
    law: the law (its log_loss, params, init_grid, published, validate_covariates are used).
    x: covariates [N, K]; loss: observed losses [N] (> 0); weights: per-point weights [N] (default 1).
    delta: the Huber threshold δ (for "huber_ml" in units of σ).
    reduction: "sum" (default) or "mean" (divides by Σ w; warns, see the module docstring).
    init: starts [S, P] in fit space (the law's parameters; "huber_ml" adds log σ from the residuals).
    max_iter, gtol, history, keep, chunk: see `lbfgs` (keep=None: every start runs to its end).
    estimator: "huber" or "huber_ml" (module docstring).
    method: "lbfgs" (`lbfgs`, the default) or "optax" (vmapped optax.lbfgs with a zoom line search, every start
      to max_iter or gtol; much slower, kept for comparison).

  Returns:
    FitResult of the best start (`select_best`): params (published names), theta [P], objective, and counts over
    the starts; `sigma` for "huber_ml".
  """
  delta = check_options(estimator, reduction, delta, method)
  if reduction == "mean":
    warnings.warn("reduction='mean' scales the objective down by the number of points: optimisers with an "
                  "absolute or max(|f|, 1)-relative stopping test (scipy's L-BFGS-B) may stop near their start "
                  "(Besiroglu et al. 2024 on Hoffmann et al.'s fit); 'sum' is the default for that reason",
                  stacklevel=2)
  if keep is not None and keep < 1:
    raise ValueError(f"keep must be a positive number of starts or None, got {keep}")
  if max_iter < 1 or history < 1 or chunk < 1:
    raise ValueError("max_iter, history and chunk must be positive")
  x, loss, w = check_data(law, x, loss, weights)
  log_l = np.log(loss)
  theta0 = fit_space_starts(law, check_init(law, init), estimator, x, log_l, delta)
  fun = lane_objective(law, delta, reduction, estimator)
  if method == "optax":
    out = _optax_starts(fun, theta0, log_l, w, x, max_iter, gtol)
  else:
    out = lbfgs(fun, theta0, (log_l, w, x), max_iter=max_iter, gtol=gtol, history=history, keep=keep,
                chunk=chunk)
  values = np.where(np.isfinite(out.value), out.value, np.inf)
  ok = converged_mask(values, out.grad_norm, out.status, gtol)
  best = select_best(values, ok)
  if best < 0:
    raise ValueError(f"no start of law {law.name!r} has a finite objective: check the data and init")
  theta = np.asarray(out.theta[best], np.float64)
  n_params = len(law.params)
  counts = np.bincount(out.status, minlength=len(STATUS_NAMES))
  return FitResult(
      law=law.name, params=law.published(theta[:n_params]), theta=theta[:n_params], objective=float(values[best]),
      grad_norm=float(out.grad_norm[best]), converged=bool(ok[best]), starts=len(values),
      converged_starts=int(ok.sum()), iterations=int(out.iterations[best]), estimator=estimator,
      sigma=float(np.exp(theta[n_params])) if estimator == "huber_ml" else None, delta=delta,
      evaluations=int(out.evaluations.sum()), status_counts=dict(zip(STATUS_NAMES, map(int, counts))))
