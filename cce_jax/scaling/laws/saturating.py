"""Saturating power law in one covariate: L(x) = L∞ + (x0 / x)^α (Henighan et al. 2020)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from cce_jax.scaling.laws.base import Law


def _saturating_log_loss(theta, x_NxK):
  """log L = LSE(e, α (log x0 − log x)); theta = (e = log L∞, log x0, α)."""
  e, log_x0, alpha = theta[0], theta[1], theta[2]
  log_x = jnp.log(x_NxK[:, 0])
  return logsumexp(jnp.stack([jnp.broadcast_to(e, log_x.shape), alpha * (log_x0 - log_x)], axis=-1), axis=-1)


def _saturating_published(theta):
  theta = np.asarray(theta, np.float64)
  return {"L_inf": float(np.exp(theta[0])), "x0": float(np.exp(theta[1])), "alpha": float(theta[2])}


SATURATING = Law(
    name="saturating", params=("e", "log_x0", "alpha"), covariates=("x",),
    log_loss=_saturating_log_loss, published=_saturating_published,
    grid={"e": np.array([-1.0, 0.0, 1.0]), "log_x0": np.array([0.0, 10.0, 20.0, 30.0, 40.0]),
          "alpha": np.array([0.05, 0.2, 0.5])})
"""L(x) = L∞ + (x0/x)^α (Henighan et al. 2020: the reducible loss is a power law in x, the irreducible L∞ is
its floor), x one positive covariate (compute, parameters or data). Fitted as log L = LSE(e, α(log x0 − log x))
with L∞ = e^e, x0 = e^log_x0. Published names: L_inf, x0, alpha. Grid: 45 starts."""
