"""Kaplan et al. (2020) joint law: L(N, D) = [(N_c / N)^(α_N / α_D) + D_c / D]^α_D."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from cce_jax.scaling.laws.base import Law

KAPLAN_PUBLISHED = {"N_c": 6.4e13, "D_c": 1.8e13, "alpha_N": 0.076, "alpha_D": 0.103}
"""Kaplan et al. (2020) Table 2, the L(N, D) fit (N without embeddings, D in tokens, loss in nats)."""


def _kaplan_log_loss(theta, x_NxK):
  """log L = α_D · LSE((α_N/α_D)(log N_c − log N), log D_c − log D); theta = (log N_c, log D_c, α_N, α_D)."""
  log_nc, log_dc, alpha_n, alpha_d = theta[0], theta[1], theta[2], theta[3]
  log_n, log_d = jnp.log(x_NxK[:, 0]), jnp.log(x_NxK[:, 1])
  terms = jnp.stack([(alpha_n / alpha_d) * (log_nc - log_n), log_dc - log_d], axis=-1)
  return alpha_d * logsumexp(terms, axis=-1)


def _kaplan_published(theta):
  theta = np.asarray(theta, np.float64)
  return {"N_c": float(np.exp(theta[0])), "D_c": float(np.exp(theta[1])), "alpha_N": float(theta[2]),
          "alpha_D": float(theta[3])}


KAPLAN = Law(
    name="kaplan", params=("log_nc", "log_dc", "alpha_n", "alpha_d"), covariates=("N", "D"),
    log_loss=_kaplan_log_loss, published=_kaplan_published,
    grid={"log_nc": np.array([20.0, 25.0, 30.0, 35.0]), "log_dc": np.array([20.0, 25.0, 30.0, 35.0]),
          "alpha_n": np.array([0.05, 0.1, 0.3]), "alpha_d": np.array([0.05, 0.1, 0.3])})
"""L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D (Kaplan et al. 2020, eq. 1.5), fitted with N_c = e^log_nc,
D_c = e^log_dc and the exponents as they are (α_D must stay away from 0: it divides α_N). Covariates N
(parameters), D (tokens), both positive. Published names: N_c, D_c, alpha_N, alpha_D. Grid: 144 starts."""
