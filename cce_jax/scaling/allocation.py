"""Compute-optimal allocation: the (N, D) that minimise a fitted law's loss at a compute budget C = 6 N D.

For Chinchilla, L = E + A N^-α + B D^-β under C = 6 N D has the closed form (Hoffmann et al. 2022, eq. 4)
  N_opt(C) = G (C/6)^(β/(α+β)),  D_opt(C) = G^-1 (C/6)^(α/(α+β)),  G = (α A / (β B))^(1/(α+β)).
`numeric_optimum` minimises any two-covariate (N, D) law along the iso-cost curve instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.scaling.laws import Law


def chinchilla_optimum(params: dict, compute):
  """(N_opt, D_opt) arrays for budgets `compute` (FLOP) from published Chinchilla parameters."""
  a, b = params["alpha"], params["beta"]
  if a <= 0 or b <= 0:
    raise ValueError(f"the closed form needs alpha > 0 and beta > 0, got {a}, {b}")
  c6 = np.asarray(compute, np.float64) / 6.0
  if (c6 <= 0).any():
    raise ValueError("compute budgets must be positive")
  g = (a * params["A"] / (b * params["B"])) ** (1.0 / (a + b))
  return g * c6 ** (b / (a + b)), c6 ** (a / (a + b)) / g


def numeric_optimum(law: Law, theta, compute, *, points: int = 4001, log10_n_range=(3.0, 16.0)):
  """(N_opt, D_opt) minimising law.log_loss along N D = C / 6: a dense grid in log N, refined by golden section."""
  if law.covariates != ("N", "D"):
    raise ValueError(f"law {law.name!r} is not a law of (N, D)")
  compute = np.atleast_1d(np.asarray(compute, np.float64))
  with jax.enable_x64(True):
    theta = jnp.asarray(theta, jnp.float64)

    def loss_at(log_n, c):
      n = jnp.exp(log_n)
      return law.log_loss(theta, jnp.stack([n, c / (6.0 * n)], axis=-1))

    def one(c):
      grid = jnp.linspace(*(np.log(10.0) * np.asarray(log10_n_range)), points)
      k = jnp.argmin(loss_at(grid, c))
      lo, hi = grid[jnp.maximum(k - 1, 0)], grid[jnp.minimum(k + 1, points - 1)]
      ratio = (np.sqrt(5.0) - 1) / 2

      def body(_, bounds):
        lo, hi = bounds
        x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        f1, f2 = loss_at(x1[None], c)[0], loss_at(x2[None], c)[0]
        return jnp.where(f1 < f2, lo, x1), jnp.where(f1 < f2, x2, hi)

      lo, hi = jax.lax.fori_loop(0, 80, body, (lo, hi))
      n = jnp.exp(0.5 * (lo + hi))
      return n, c / (6.0 * n)

    n, d = jax.vmap(one)(jnp.asarray(compute))
    return np.asarray(n), np.asarray(d)
