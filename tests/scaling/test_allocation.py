"""Chinchilla's closed-form compute-optimal allocation equals numeric minimisation along the iso-cost curve."""

from __future__ import annotations

import numpy as np
import pytest

from cce_jax import scaling
from cce_jax.scaling import allocation


@pytest.mark.parametrize("theta", [[6.17, 7.67, 0.597, 0.347, 0.367], [5.0, 9.0, 0.2, 0.5, 0.3],
                                   [7.0, 6.0, 0.7, 0.3, 0.45]])
def test_closed_form_equals_numeric(theta):
  params = scaling.CHINCHILLA.published(np.asarray(theta))
  compute = np.array([1e18, 1e21, 5.76e23, 1e26])
  n_cf, d_cf = allocation.chinchilla_optimum(params, compute)
  n_num, d_num = allocation.numeric_optimum(scaling.CHINCHILLA, theta, compute)
  np.testing.assert_allclose(n_num, n_cf, rtol=1e-6)
  np.testing.assert_allclose(d_num, d_cf, rtol=1e-6)
  np.testing.assert_allclose(6 * n_cf * d_cf, compute, rtol=1e-12)


def test_chinchilla_paper_scale():
  # Under Epoch AI's fit, Chinchilla's 5.76e23 FLOP budget goes to ~73B parameters and ~18 tokens each.
  params = dict(A=477.8, B=2143.8, E=1.8172, alpha=0.3473, beta=0.3672)
  n, d = allocation.chinchilla_optimum(params, 5.76e23)
  assert 7.0e10 < n < 7.6e10 and 17 < d / n < 19


def test_bad_input():
  with pytest.raises(ValueError, match="positive"):
    allocation.chinchilla_optimum(dict(A=1.0, B=1.0, E=1.0, alpha=0.3, beta=0.3), [-1.0])
  with pytest.raises(ValueError, match="alpha > 0"):
    allocation.chinchilla_optimum(dict(A=1.0, B=1.0, E=1.0, alpha=0.0, beta=0.3), [1e20])
