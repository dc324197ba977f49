"""Fitting a law: Huber loss on log-loss residuals, vmapped multi-start L-BFGS in float64, best start kept.

objective(theta) = Σ_i w_i · Huber_δ(log_loss(theta, x_i) − log L_i)     (reduction "sum", the default)
Hoffmann et al. report a mean; Besiroglu et al. found that with the mean the optimiser stops near its start
because the objective's scale is tiny, so "mean" warns. Every start runs L-BFGS (`minimize`, vmapped over the
starts) until its gradient norm is below `gtol` or `max_iter`; the start with the lowest objective among the converged ones
wins (among all, flagged, if none converged).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cce_jax.scaling.laws import Law


def huber(r, delta):
  """Huber_δ(r): r²/2 for |r| <= δ, δ(|r| − δ/2) beyond."""
  a = jnp.abs(r)
  return jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


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
  return x, loss, w


def objective_fn(law: Law, x, log_l, w, delta, reduction):
  def objective(theta):
    total = jnp.sum(w * huber(law.log_loss(theta, x) - log_l, delta))
    return total / jnp.sum(w) if reduction == "mean" else total
  return objective


def minimize(objective, theta0_SxP, *, max_iter=300, gtol=1e-9):
  """Vmapped L-BFGS (optax, zoom line search) from each row of theta0.

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


@dataclasses.dataclass
class FitResult:
  law: str
  params: dict  # published names -> values
  theta: np.ndarray  # fit-space parameters of the best start
  objective: float
  grad_norm: float
  converged: bool
  starts: int
  converged_starts: int
  iterations: int


def fit(law: Law, x, loss, *, weights=None, delta: float = 1e-3, reduction: str = "sum", init=None,
        max_iter: int = 300, gtol: float = 1e-9) -> FitResult:
  """Fits `law` to (x [N, K], loss [N]) from every start of `init` ([S, P]; default the law's grid)."""
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
  if reduction == "mean":
    warnings.warn("reduction='mean' scales the objective down by the number of points: L-BFGS may stop near its "
                  "start (Besiroglu et al. 2024 on Hoffmann et al.'s fit); 'sum' is the default for that reason",
                  stacklevel=2)
  x, loss, w = check_data(law, x, loss, weights)
  init = law.init_grid() if init is None else np.atleast_2d(np.asarray(init, np.float64))
  if init.shape[1] != len(law.params):
    raise ValueError(f"init must have {len(law.params)} columns ({', '.join(law.params)}), got {init.shape}")
  with jax.enable_x64(True):
    objective = objective_fn(law, jnp.asarray(x), jnp.log(jnp.asarray(loss)), jnp.asarray(w), delta, reduction)
    theta, values, gnorms, iters = jax.device_get(
        jax.jit(lambda t: minimize(objective, t, max_iter=max_iter, gtol=gtol))(jnp.asarray(init)))
  values = np.where(np.isfinite(values), values, np.inf)
  ok = (gnorms <= max(gtol, 1e-6)) & np.isfinite(values)  # converged (a loose bound: gtol is very strict)
  pool = np.flatnonzero(ok) if ok.any() else np.arange(len(values))
  best = pool[np.argmin(values[pool])]
  return FitResult(law=law.name, params=law.published(theta[best]), theta=np.asarray(theta[best]),
                   objective=float(values[best]), grad_norm=float(gnorms[best]), converged=bool(ok[best]),
                   starts=len(values), converged_starts=int(ok.sum()), iterations=int(iters[best]))
