"""Data-constrained law with repeated data and excess parameters (Muennighoff et al. 2023, eq. 5–7).

  L(N, D, U_D) = E + A / N'^α + B / D'^β
  D' = U_D + U_D R_D* (1 − exp(−R_D / R_D*)),   R_D = max(D / U_D − 1, 0)        (repeated epochs)
  N' = U_N + U_N R_N* (1 − exp(−R_N / R_N*)),   U_N = min(N, N_opt(U_D)),  R_N = max(N / U_N − 1, 0)
  N_opt(U_D) = G (G U_D)^(β/α),  G = (α A / (β B))^(1/(α+β))

N_opt(U_D) is Chinchilla's compute-optimal N at the budget for which U_D tokens is the optimal D (same A, B, α, β):
with C/6 = (G U_D)^((α+β)/α), N_opt = G (C/6)^(β/(α+β)). Parameters beyond U_N and epochs beyond the first decay in
value with the half-lives R_N*, R_D* (in units of U_N and U_D).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from cce_jax.scaling.laws.base import Law

_BASE = ("a", "b", "e", "alpha", "beta")
_DECAY = ("log_rd_star", "log_rn_star")

MUENNIGHOFF_THETA = np.array([6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596, np.log(15.387756),
                              np.log(5.309743)])
"""Fit-space parameters of Muennighoff et al. (2023) (a, b, e, α, β from their Chinchilla C4 fit, R_D* = 15.387756,
R_N* = 5.309743 fitted on their 182 runs), in DATA_CONSTRAINED's `params` order."""


def _log_loss(base, log_rd_star, log_rn_star, x_NxK):
  a, b, e, alpha, beta = base
  log_n, log_d, log_u = jnp.log(x_NxK[:, 0]), jnp.log(x_NxK[:, 1]), jnp.log(x_NxK[:, 2])
  rd_star, rn_star = jnp.exp(log_rd_star), jnp.exp(log_rn_star)
  r_d = jnp.maximum(jnp.exp(log_d - log_u) - 1.0, 0.0)
  log_d_eff = log_u + jnp.log1p(-rd_star * jnp.expm1(-r_d / rd_star))
  log_g = (jnp.log(alpha) + a - jnp.log(beta) - b) / (alpha + beta)
  log_u_n = jnp.minimum(log_n, log_g + (beta / alpha) * (log_g + log_u))
  r_n = jnp.expm1(log_n - log_u_n)  # >= 0 since U_N <= N
  log_n_eff = log_u_n + jnp.log1p(-rn_star * jnp.expm1(-r_n / rn_star))
  terms = jnp.stack([a - alpha * log_n_eff, b - beta * log_d_eff, jnp.broadcast_to(e, log_n.shape)], axis=-1)
  return logsumexp(terms, axis=-1)


def data_constrained_law(base: dict | None = None, name: str | None = None) -> Law:
  """The data-constrained law; with `base` = {a, b, e, alpha, beta} (fit space) those are frozen.

  Fit space: A = e^a, B = e^b, E = e^e, α, β as they are, R_D* = e^log_rd_star, R_N* = e^log_rn_star. Covariates
  N (parameters), D (tokens seen), U_D (unique tokens), all positive. log_loss(theta [P], x [N, 3]) -> log L [N].
  Muennighoff et al. freeze the Chinchilla part (fitted on Chinchilla's C4 IsoFLOP points) and fit only R_D*, R_N*:
  pass `base` for that. Published names: A, B, E, alpha, beta, R_D_star, R_N_star.
  """
  if base is not None:
    missing = [k for k in _BASE if k not in base]
    if missing:
      raise ValueError(f"base must give every one of {_BASE}; missing {missing}")
    frozen = tuple(float(base[k]) for k in _BASE)
    if not (frozen[3] > 0 and frozen[4] > 0):
      raise ValueError(f"alpha and beta must be positive, got {frozen[3]}, {frozen[4]}")

  def log_loss(theta, x_NxK):
    if base is None:
      return _log_loss(tuple(theta[i] for i in range(5)), theta[5], theta[6], x_NxK)
    return _log_loss(frozen, theta[0], theta[1], x_NxK)

  def published(theta):
    theta = np.asarray(theta, np.float64)
    full = np.concatenate([frozen, theta]) if base is not None else theta
    return {"A": float(np.exp(full[0])), "B": float(np.exp(full[1])), "E": float(np.exp(full[2])),
            "alpha": float(full[3]), "beta": float(full[4]), "R_D_star": float(np.exp(full[5])),
            "R_N_star": float(np.exp(full[6]))}

  decay_grid = {"log_rd_star": np.log([1.0, 5.0, 15.0, 40.0]), "log_rn_star": np.log([1.0, 5.0, 15.0, 40.0])}
  if base is None:
    params = _BASE + _DECAY
    grid = {"a": np.array([4.0, 7.0]), "b": np.array([4.0, 7.0]), "e": np.array([0.0, 0.7]),
            "alpha": np.array([0.3]), "beta": np.array([0.3]), **decay_grid}
  else:
    params, grid = _DECAY, decay_grid
  return Law(name=name or ("data_constrained" if base is None else "data_constrained_decay"), params=params,
             covariates=("N", "D", "U_D"), log_loss=log_loss, published=published, grid=grid)


DATA_CONSTRAINED = data_constrained_law()
"""All seven parameters free (a, b, e, alpha, beta, log_rd_star, log_rn_star). Grid: 128 starts."""

MUENNIGHOFF_DECAY = data_constrained_law(dict(zip(_BASE, MUENNIGHOFF_THETA[:5])), name="data_constrained_muennighoff")
"""R_D*, R_N* only, on top of Muennighoff et al.'s frozen Chinchilla part (their fitting procedure). Grid: 16 starts."""
