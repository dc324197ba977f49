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

`lbfgs` runs every start (a row of theta [S, P]) through L-BFGS at once. One loop steps all starts together: each
step evaluates the objective and gradient of the still-running starts at their trial points with one jitted,
vmapped function (called on fixed-size chunks, so it compiles once), then each start accepts its step (Armijo) and
takes a new two-loop direction, or backtracks. The per-start bookkeeping is float64 numpy on the host: as a JAX
`while_loop` it compiled for several seconds on CPU, longer than the whole fit now takes. A start stops when its
gradient norm is <= gtol (converged), when it cannot make progress (stalled: its line search cannot change the
objective, or the objective stops decreasing), or at max_iter. With `keep`, starts race: after 5 steps, and each
time the step count doubles, only the best quarter (lowest objective) of the running starts goes on, down to `keep`
starts; the others stop as "pruned". `fit` keeps the start with the lowest finite objective (a converged one when
one is as low, to rounding).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cce_jax.scaling.laws import Law

ESTIMATORS = ("huber", "huber_ml")
METHODS = ("lbfgs", "optax")

ACTIVE, CONVERGED, STALLED, MAX_ITER, PRUNED, FAILED = range(6)
STATUS_NAMES = ("active", "converged", "stalled", "max_iter", "pruned", "failed")


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


class LbfgsResult(NamedTuple):
  """Per start (numpy): theta [S, P] float64, value [S], grad_norm [S], iterations [S], evaluations [S] and
  status [S] (int: ACTIVE .. FAILED, see STATUS_NAMES)."""
  theta: np.ndarray
  value: np.ndarray
  grad_norm: np.ndarray
  iterations: np.ndarray
  evaluations: np.ndarray
  status: np.ndarray


_VALUE_AND_GRAD: collections.OrderedDict = collections.OrderedDict()


def _value_and_grad(fun, per_start: tuple):
  """jit(vmap(value_and_grad(fun))) over theta and the args flagged in per_start; cached per (fun, per_start)."""
  key = (fun, per_start)
  if key not in _VALUE_AND_GRAD:
    in_axes = (0,) + tuple(0 if b else None for b in per_start)
    _VALUE_AND_GRAD[key] = jax.jit(jax.vmap(jax.value_and_grad(fun), in_axes=in_axes))
    while len(_VALUE_AND_GRAD) > 64:
      _VALUE_AND_GRAD.popitem(last=False)
  _VALUE_AND_GRAD.move_to_end(key)
  return _VALUE_AND_GRAD[key]


def _dot(a, b):
  return (a * b).sum(axis=-1)


def _two_loop(g_AxP, s_AxMxP, y_AxMxP, rho_AxM, pairs_A):
  """-H g per start: the L-BFGS two-loop recursion over the last `pairs` rows of the history (newest last)."""
  m = s_AxMxP.shape[1]
  first = m - int(pairs_A.max(initial=0))  # rows before this one are empty for every start
  rho = np.where(np.arange(m) >= m - pairs_A[:, None], rho_AxM, 0.0)  # empty rows count for nothing
  q = g_AxP.copy()
  alpha = np.zeros(rho.shape)
  for j in range(m - 1, first - 1, -1):
    alpha[:, j] = rho[:, j] * _dot(s_AxMxP[:, j], q)
    q -= alpha[:, j, None] * y_AxMxP[:, j]
  sy, yy = _dot(s_AxMxP[:, -1], y_AxMxP[:, -1]), _dot(y_AxMxP[:, -1], y_AxMxP[:, -1])
  r = np.where((pairs_A > 0) & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 1.0)[:, None] * q
  for j in range(first, m):
    r += (alpha[:, j] - rho[:, j] * _dot(y_AxMxP[:, j], r))[:, None] * s_AxMxP[:, j]
  return -r


def _first_step(gnorm):
  return np.minimum(1.0, 1.0 / np.maximum(gnorm, 1e-300))


class _Starts:
  """Every start's L-BFGS state (numpy, leading axis S); the driver updates the running ones in place."""

  def __init__(self, theta0_SxP, history):
    n, p = theta0_SxP.shape
    self.x = theta0_SxP.copy()  # current point
    self.f = np.full(n, np.inf)  # objective at x (inf before the first evaluation)
    self.g = np.zeros((n, p))  # gradient at x
    self.d = np.zeros((n, p))  # search direction
    self.t = np.zeros(n)  # trial step: the next evaluation is at x + t d
    self.gd = np.zeros(n)  # g · d
    self.s = np.zeros((n, history, p))  # steps, oldest first
    self.y = np.zeros((n, history, p))  # gradient changes
    self.rho = np.zeros((n, history))  # 1 / (s · y)
    self.pairs = np.zeros(n, np.int64)  # valid history rows (the last `pairs`)
    self.f_mark = np.full(n, np.inf)  # objective at the last progress check
    self.iters = np.zeros(n, np.int64)  # accepted steps
    self.evals = np.zeros(n, np.int64)  # objective evaluations
    self.status = np.full(n, ACTIVE, np.int64)


def _react(st: _Starts, a, ft, gt, *, gtol, max_iter, max_evals, c1=1e-4, check_every=20, ftol=1e-10):
  """The running starts `a` react to the objective ft [A] and gradient gt [A, P] at their trial points x + t d:
  accept the step (Armijo) and take a new two-loop direction, or backtrack; then update their status."""
  m = st.s.shape[1]
  x, f, g, d, t, gd, pairs = st.x[a], st.f[a], st.g[a], st.d[a], st.t[a], st.gd[a], st.pairs[a]
  xt = x + t[:, None] * d
  with np.errstate(invalid="ignore", over="ignore"):
    finite = np.isfinite(ft) & np.isfinite(gt).all(axis=1)
    first = ~np.isfinite(f)  # the start point itself was evaluated
    accept = finite & (first | (ft <= f + c1 * t * gd))

  # Accepted: keep (s, y) when the curvature is positive, then a new direction from x_t.
  acc, rej = a[accept], a[~accept]
  if len(acc):
    s_new, y_new = xt[accept] - x[accept], gt[accept] - g[accept]
    sy = _dot(s_new, y_new)
    good = ~first[accept] & (sy > 1e-12 * np.sqrt(_dot(s_new, s_new) * _dot(y_new, y_new))) & (sy > 0)
    hist_s, hist_y, rho, n_pairs = st.s[acc], st.y[acc], st.rho[acc], pairs[accept]
    hist_s[good] = np.concatenate([hist_s[good, 1:], s_new[good, None]], axis=1)
    hist_y[good] = np.concatenate([hist_y[good, 1:], y_new[good, None]], axis=1)
    rho[good] = np.concatenate([rho[good, 1:], 1.0 / sy[good, None]], axis=1)
    n_pairs = np.where(good, np.minimum(n_pairs + 1, m), n_pairs)
    g_new, f_new = gt[accept], ft[accept]
    gnorm = np.sqrt(_dot(g_new, g_new))
    d_new = _two_loop(g_new, hist_s, hist_y, rho, n_pairs)
    gd_new = _dot(g_new, d_new)
    descent = (gd_new < 0) & np.isfinite(d_new).all(axis=1)
    d_new = np.where(descent[:, None], d_new, -g_new)
    gd_new = np.where(descent, gd_new, -gnorm**2)
    n_pairs = np.where(descent, n_pairs, 0)
    iters = st.iters[acc] + ~first[accept]
    check = ~first[accept] & (iters % check_every == 0)
    no_progress = check & (st.f_mark[acc] - f_new <= ftol * np.abs(f_new))
    st.f_mark[acc] = np.where(check | first[accept], f_new, st.f_mark[acc])
    st.x[acc], st.f[acc], st.g[acc], st.d[acc], st.gd[acc] = xt[accept], f_new, g_new, d_new, gd_new
    st.t[acc] = np.where(n_pairs > 0, 1.0, _first_step(gnorm))
    st.s[acc], st.y[acc], st.rho[acc], st.pairs[acc], st.iters[acc] = hist_s, hist_y, rho, n_pairs, iters
    status = np.where(no_progress, STALLED, ACTIVE)
    st.status[acc] = np.where(gnorm <= gtol, CONVERGED, status)

  # Rejected: backtrack by safeguarded quadratic interpolation. A step too small to change the objective resets
  # the history (steepest descent next) or, with no history, stalls the start; a start point that is not finite
  # fails.
  if len(rej):
    r = ~accept
    f, t, gd, ftr = f[r], t[r], gd[r], ft[r]
    with np.errstate(invalid="ignore", over="ignore"):
      denom = 2.0 * (ftr - f - gd * t)
      ok = finite[r] & (denom > 0)
      t_quad = np.where(ok, -gd * t * t / np.where(ok, denom, 1.0), 0.1 * t)
    t_back = np.clip(t_quad, 0.1 * t, 0.5 * t)
    with np.errstate(invalid="ignore"):
      tiny = -t_back * gd <= 1e-15 * np.abs(f)
    reset = tiny & (pairs[r] > 0)
    g = g[r]
    gnorm = np.sqrt(_dot(g, g))
    st.d[rej] = np.where(reset[:, None], -g, d[r])
    st.gd[rej] = np.where(reset, -gnorm**2, gd)
    st.t[rej] = np.where(reset, _first_step(gnorm), t_back)
    st.pairs[rej] = np.where(reset, 0, pairs[r])
    status = np.where(tiny & (pairs[r] == 0), STALLED, ACTIVE)
    st.status[rej] = np.where(first[r], FAILED, status)

  st.evals[a] += 1
  over = (st.status[a] == ACTIVE) & ((st.iters[a] >= max_iter) | (st.evals[a] >= max_evals))
  st.status[a[over]] = MAX_ITER


def _evaluate(value_and_grad, theta_AxP, starts_A, args, per_start, chunk):
  """(objective [A], gradient [A, P]) at theta for the starts `starts` (their rows of the per-start args), in
  chunks of `chunk` (the last one padded), so one compiled shape serves any number of running starts. Chunks are
  dispatched before any result is read."""
  n = len(theta_AxP)
  padded = -(-n // chunk) * chunk
  take = np.minimum(np.arange(padded), n - 1)
  theta, rows = theta_AxP[take], starts_A[take]
  args = [arg[rows] if b else arg for arg, b in zip(args, per_start)]
  outs = [value_and_grad(theta[i:i + chunk], *(arg[i:i + chunk] if b else arg for arg, b in zip(args, per_start)))
          for i in range(0, padded, chunk)]
  values = np.concatenate([np.asarray(o[0]) for o in outs])[:n]
  grads = np.concatenate([np.asarray(o[1]) for o in outs])[:n]
  return values, grads


def lbfgs(fun: Callable, theta0_SxP, args=(), *, per_start=None, max_iter: int = 1000, gtol: float = 1e-9,
          history: int = 10, keep: int | None = 64, chunk: int = 32, max_evals: int | None = None,
          race_start: int = 5) -> LbfgsResult:
  """Multi-start L-BFGS in float64: minimises fun(theta [P], *args) from each row of theta0 [S, P].

  One loop runs all starts: each step evaluates the objective and gradient of the running starts at their trial
  points (one jitted, vmapped function, called on chunks), then every running start accepts its step (Armijo
  condition) and takes a new direction from the two-loop recursion over its last `history` pairs, or backtracks
  (safeguarded quadratic interpolation). Starts that stop drop out of the batch.

  Args:
    fun: scalar objective, traceable by JAX; evaluated in float64.
    theta0_SxP: starts [S, P].
    args: arrays passed to fun after theta; every start sees them whole, except those flagged in per_start.
    per_start: one bool per arg: True when the arg has a leading axis S and start s sees row s (e.g. per-start
      data weights [S, N]). Default: none.
    max_iter: accepted steps per start; max_evals: evaluations per start (default 2 max_iter + 50).
    gtol: a start converges when its gradient norm is <= gtol. A start also stops when its line search cannot
      change the objective or its objective falls by less than 1e-10 (relative) over 20 steps (stalled).
    history: m, the (s, y) pairs kept per start.
    keep: race the starts down to this many: after `race_start` steps, and each time the step count doubles, only
      the best quarter (lowest objective) of the running starts goes on, never fewer than `keep`; the others stop
      as pruned. None: no race (every start runs to its end; use it when the starts solve different problems).
    chunk: starts per call of the compiled objective (fewer starts: the next power of two).

  Returns:
    LbfgsResult (numpy arrays with leading axis S).
  """
  theta0_SxP = np.array(theta0_SxP, np.float64, copy=True)
  if theta0_SxP.ndim != 2:
    raise ValueError(f"theta0 must have shape [starts, params], got {theta0_SxP.shape}")
  n_starts = theta0_SxP.shape[0]
  per_start = (False,) * len(args) if per_start is None else tuple(bool(b) for b in per_start)
  if len(per_start) != len(args):
    raise ValueError(f"per_start needs one flag per arg ({len(args)}), got {len(per_start)}")
  args = tuple(np.asarray(arg) for arg in args)
  if any(b and arg.shape[:1] != (n_starts,) for arg, b in zip(args, per_start)):
    raise ValueError(f"args flagged per_start must have a leading axis of {n_starts} (one row per start)")
  if keep is not None and keep < 1:
    raise ValueError(f"keep must be a positive number of starts or None, got {keep}")
  if min(max_iter, history, chunk, race_start) < 1 or (max_evals is not None and max_evals < 1):
    raise ValueError("max_iter, max_evals, history, chunk and race_start must be positive")
  max_evals = 2 * max_iter + 50 if max_evals is None else max_evals
  chunk = min(chunk, 1 << (n_starts - 1).bit_length())  # a power of two for few starts: few compiled shapes
  st = _Starts(theta0_SxP, history)
  with jax.enable_x64(True):
    value_and_grad = _value_and_grad(fun, per_start)
    args = tuple(arg if b else jnp.asarray(arg) for arg, b in zip(args, per_start))
    step, next_race = 0, race_start
    while True:
      a = np.flatnonzero(st.status == ACTIVE)
      if len(a) == 0:
        break
      ft, gt = _evaluate(value_and_grad, st.x[a] + st.t[a, None] * st.d[a], a, args, per_start, chunk)
      _react(st, a, ft, gt, gtol=gtol, max_iter=max_iter, max_evals=max_evals)
      step += 1
      if keep is not None and step >= next_race:
        next_race *= 2
        a = np.flatnonzero(st.status == ACTIVE)
        if len(a) > keep:
          n_keep = max(keep, -(-len(a) // 4))
          threshold = np.partition(st.f[a], n_keep - 1)[n_keep - 1]
          st.status[a[st.f[a] > threshold]] = PRUNED
  return LbfgsResult(theta=st.x, value=st.f, grad_norm=np.sqrt(_dot(st.g, st.g)), iterations=st.iters,
                     evaluations=st.evals, status=st.status)


def minimize(objective, theta0_SxP, *, max_iter=300, gtol=1e-9):
  """Vmapped L-BFGS (optax, zoom line search) from each row of theta0 (the `method="optax"` path of `fit`).

  Returns (theta [S, P], objective [S], gradient norm [S], iterations [S]). A start stops when its gradient norm
  is <= gtol or after max_iter steps; under vmap the batch runs until its slowest start stops.
  """
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def one(theta0):
    def cond(carry):
      _, _, it, gnorm = carry
      return (it < max_iter) & (gnorm > gtol)

    def body(carry):
      theta, state, it, _ = carry
      value, grad = value_and_grad(theta, state=state)
      updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=objective)
      return optax.apply_updates(theta, updates), state, it + 1, optax.tree.norm(grad)

    init = (theta0, opt.init(theta0), jnp.zeros((), jnp.int32), jnp.array(jnp.inf, theta0.dtype))
    theta, _, it, _ = jax.lax.while_loop(cond, body, init)
    value, grad = jax.value_and_grad(objective)(theta)
    return theta, value, jnp.linalg.norm(grad), it

  return jax.vmap(one)(theta0_SxP)


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
