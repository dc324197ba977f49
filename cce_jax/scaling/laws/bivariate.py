"""Encoder/decoder law for translation (Ghorbani et al. 2021): L = α (N̄_e/N_e)^p_e (N̄_d/N_d)^p_d + L∞."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from cce_jax.scaling.laws.base import Law

REFERENCE_PARAMS = 1e8
"""Default N̄_e = N̄_d. The paper normalises by its baseline model's encoder and decoder sizes; the reference
only rescales α (α·N̄_e^p_e·N̄_d^p_d is invariant), so pass the paper's sizes to compare α with theirs."""


def bivariate_law(n_e_ref: float = REFERENCE_PARAMS, n_d_ref: float = REFERENCE_PARAMS,
                  name: str = "bivariate") -> Law:
  """L(N_e, N_d) = α (N̄_e/N_e)^p_e (N̄_d/N_d)^p_d + L∞ with fixed references N̄_e = n_e_ref, N̄_d = n_d_ref.

  Fitted as log L = LSE(log α + p_e (log N̄_e − log N_e) + p_d (log N̄_d − log N_d), e) with L∞ = e^e.
  Covariates N_e, N_d (encoder and decoder parameters, positive). Published names: alpha, p_e, p_d, L_inf.
  """
  if not (n_e_ref > 0 and n_d_ref > 0):
    raise ValueError(f"reference sizes must be positive, got n_e_ref={n_e_ref}, n_d_ref={n_d_ref}")
  log_e_ref, log_d_ref = float(np.log(n_e_ref)), float(np.log(n_d_ref))

  def log_loss(theta, x_NxK):
    log_alpha, p_e, p_d, e = theta[0], theta[1], theta[2], theta[3]
    power = log_alpha + p_e * (log_e_ref - jnp.log(x_NxK[:, 0])) + p_d * (log_d_ref - jnp.log(x_NxK[:, 1]))
    return logsumexp(jnp.stack([power, jnp.broadcast_to(e, power.shape)], axis=-1), axis=-1)

  def published(theta):
    theta = np.asarray(theta, np.float64)
    return {"alpha": float(np.exp(theta[0])), "p_e": float(theta[1]), "p_d": float(theta[2]),
            "L_inf": float(np.exp(theta[3]))}

  return Law(name=name, params=("log_alpha", "p_e", "p_d", "e"), covariates=("N_e", "N_d"),
             log_loss=log_loss, published=published,
             grid={"log_alpha": np.array([-2.0, 0.0, 1.0]), "p_e": np.array([0.1, 0.3, 0.6]),
                   "p_d": np.array([0.1, 0.3, 0.6]), "e": np.array([-1.0, 0.0, 1.0])})


BIVARIATE = bivariate_law()
"""The encoder/decoder law with N̄_e = N̄_d = REFERENCE_PARAMS (1e8). Grid: 81 starts."""
