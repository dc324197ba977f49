"""Over-training law and the loss-to-error link (Gadre et al. 2024).

  L(C, M) = E + (a M^η + b M^−η) C^−η        C = 6 N D (FLOP), M = D / N (tokens per parameter)
  Err(L) = ε − k exp(−γ L)                    average top-1 error from the loss

The loss law is Chinchilla with tied exponents (α = β = 2η) rewritten in (C, M): with D = M N and N = (C/(6M))^½,
E + A N^−2η + B D^−2η = E + (A 6^η M^η + B 6^η M^−η) C^−η, so a = 6^η A and b = 6^η B.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from cce_jax.scaling.laws.base import Law


def overtraining_covariates(n, d):
  """x [P, 2] = (C = 6 N D, M = D / N) from parameters n [P] and tokens d [P] (float64)."""
  n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
  if n.shape != d.shape or n.ndim != 1:
    raise ValueError(f"n and d must be 1-D arrays of the same length, got {n.shape} and {d.shape}")
  if (n <= 0).any() or (d <= 0).any():
    raise ValueError("parameters and tokens must be positive")
  return np.stack([6.0 * n * d, d / n], axis=1)


def _overtraining_log_loss(theta, x_NxK):
  """log L = LSE(log a + η log M − η log C, log b − η log M − η log C, e); theta = (log a, log b, e, η)."""
  log_a, log_b, e, eta = theta[0], theta[1], theta[2], theta[3]
  log_c, log_m = jnp.log(x_NxK[:, 0]), jnp.log(x_NxK[:, 1])
  terms = jnp.stack([log_a + eta * (log_m - log_c), log_b - eta * (log_m + log_c),
                     jnp.broadcast_to(e, log_c.shape)], axis=-1)
  return logsumexp(terms, axis=-1)


def _overtraining_published(theta):
  theta = np.asarray(theta, np.float64)
  return {"a": float(np.exp(theta[0])), "b": float(np.exp(theta[1])), "E": float(np.exp(theta[2])),
          "eta": float(theta[3])}


OVERTRAINING = Law(
    name="overtraining", params=("log_a", "log_b", "e", "eta"), covariates=("C", "M"),
    log_loss=_overtraining_log_loss, published=_overtraining_published,
    grid={"log_a": np.array([4.0, 6.0, 8.0]), "log_b": np.array([4.0, 6.0, 8.0]), "e": np.array([0.0, 0.7, 1.2]),
          "eta": np.array([0.05, 0.15])})
"""L(C, M) = E + (a M^η + b M^−η) C^−η (Gadre et al. 2024, eq. 4) with a = e^log_a, b = e^log_b, E = e^e.
Covariates C (FLOP, 6ND) and M (D/N), positive; `overtraining_covariates(n, d)` builds them. Published names:
a, b, E, eta. Grid: 54 starts."""


def _error_log(theta, x_NxK):
  """log Err = log(ε − k e^(−γ L)); theta = (log ε, log k, log γ), x[:, 0] = L. Floored at 1e-12 (Err <= 0)."""
  log_eps, log_k, log_gamma = theta[0], theta[1], theta[2]
  err = jnp.exp(log_eps) - jnp.exp(log_k - jnp.exp(log_gamma) * x_NxK[:, 0])
  return jnp.log(jnp.maximum(err, 1e-12))


def _error_published(theta):
  theta = np.asarray(theta, np.float64)
  return {"epsilon": float(np.exp(theta[0])), "k": float(np.exp(theta[1])), "gamma": float(np.exp(theta[2]))}


DOWNSTREAM_ERROR = Law(
    name="downstream_error", params=("log_eps", "log_k", "log_gamma"), covariates=("L",),
    log_loss=_error_log, published=_error_published,
    grid={"log_eps": np.log([0.7, 0.9]), "log_k": np.log([0.5, 3.0, 20.0]), "log_gamma": np.log([0.3, 1.0, 2.0])})
"""Err(L) = ε − k exp(−γ L) (Gadre et al. 2024, eq. 5): average top-1 error from the loss L. Here the "loss" that
`fit` receives is the error and `log_loss` returns log Err (so the fit is Huber on log Err; Gadre et al. fit Err by
least squares). ε = e^log_eps (the error as L → ∞, near chance), k = e^log_k, γ = e^log_gamma. Covariate L
(positive). Published names: epsilon, k, gamma. Grid: 18 starts."""
