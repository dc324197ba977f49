"""Batched multi-start L-BFGS in float64: every start (a row of theta [S, P]) of one objective at once.

`lbfgs` runs every start (a row of theta [S, P]) through L-BFGS at once. One loop steps all starts together: each
step evaluates the objective and gradient of the still-running starts at their trial points with one jitted,
vmapped function (called on fixed-size chunks, so it compiles once), then each start accepts its step (Armijo) and
takes a new two-loop direction, or backtracks. The per-start bookkeeping is float64 numpy on the host: as a JAX
`while_loop` it compiled for several seconds on CPU, longer than the whole fit now takes. A start stops when its
gradient norm is <= gtol (converged), when it cannot make progress (stalled: its line search cannot change the
objective, or the objective stops decreasing), or at max_iter. With `keep`, starts race: after 5 steps, and each
time the step count doubles, only the best quarter (lowest objective) of the running starts goes on, down to `keep`
starts; the others stop as "pruned". (`fitting.fit` then keeps the start with the lowest finite objective, a
converged one when one is as low, to rounding.)

`minimize` is the same search through optax's L-BFGS (zoom line search) under `jax.vmap`, all in JAX.
"""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ACTIVE, CONVERGED, STALLED, MAX_ITER, PRUNED, FAILED = range(6)
STATUS_NAMES = ("active", "converged", "stalled", "max_iter", "pruned", "failed")


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
