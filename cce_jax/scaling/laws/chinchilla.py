"""Chinchilla: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022), untied and tied exponents."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from cce_jax.scaling.laws.base import Law


def _chinchilla_log_loss(theta, x, tied):
  a, b, e, alpha = theta[0], theta[1], theta[2], theta[3]
  beta = alpha if tied else theta[4]
  log_n, log_d = jnp.log(x[:, 0]), jnp.log(x[:, 1])
  terms = jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)], axis=-1)
  return logsumexp(terms, axis=-1)


def _chinchilla_published(theta, tied):
  theta = np.asarray(theta, np.float64)
  out = {"A": float(np.exp(theta[0])), "B": float(np.exp(theta[1])), "E": float(np.exp(theta[2])),
         "alpha": float(theta[3])}
  out["beta"] = out["alpha"] if tied else float(theta[4])
  return out


_CHINCHILLA_GRID = {"alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5),
                    "e": np.arange(-1, 1.01, 0.5), "a": np.arange(0, 25.01, 5), "b": np.arange(0, 25.01, 5)}

CHINCHILLA = Law(
    name="chinchilla", params=("a", "b", "e", "alpha", "beta"), covariates=("N", "D"),
    log_loss=lambda theta, x: _chinchilla_log_loss(theta, x, tied=False),
    published=lambda theta: _chinchilla_published(theta, tied=False), grid=_CHINCHILLA_GRID)
"""L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022), fitted as log L = LSE(a - alpha log N,
b - beta log D, e) with A = e^a, B = e^b, E = e^e. Chinchilla's grid: 4,500 starts."""

CHINCHILLA_TIED = Law(
    name="chinchilla_tied", params=("a", "b", "e", "alpha"), covariates=("N", "D"),
    log_loss=lambda theta, x: _chinchilla_log_loss(theta, x, tied=True),
    published=lambda theta: _chinchilla_published(theta, tied=True),
    grid={k: v for k, v in _CHINCHILLA_GRID.items() if k != "beta"})
"""Chinchilla with one exponent for parameters and data (alpha = beta)."""

