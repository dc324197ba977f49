"""Scaling laws as pure functions of (fit-space parameters, covariates), with names, published forms and grids.

A `Law` predicts log-loss: fitting happens on log L (Hoffmann et al.'s procedure), so every law returns
`log_loss(theta_P, x_NxK) -> [N]`. Parameters that must be positive are fitted as logs and reported through
`published(theta)` under the names the papers use.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Law:
  """name; fit-space parameter names; covariate names (columns of x); log_loss(theta, x); published(theta) ->
  {paper name: value}; grid: {fit-space name: start values} whose product is the multi-start grid."""

  name: str
  params: tuple[str, ...]
  covariates: tuple[str, ...]
  log_loss: Callable
  published: Callable
  grid: dict

  def init_grid(self) -> np.ndarray:
    """[starts, P]: the Cartesian product of the grid values, in `params` order."""
    return np.array(list(itertools.product(*(self.grid[p] for p in self.params))), np.float64)

  def validate_covariates(self, x) -> None:
    """Raises ValueError when x [N, K] is outside the law's domain (default: every covariate must be positive).

    Laws whose covariates may be zero or negative override this (subclass Law or wrap it)."""
    if (x <= 0).any():
      bad = [self.covariates[k] for k in range(x.shape[1]) if (x[:, k] <= 0).any()]
      raise ValueError(f"covariates must be positive; non-positive values in {bad}")
