"""The exp / tanh formulas of the Pallas kernels' fast path, evaluated with jnp (interpret mode)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cce_jax.ops.linear_cross_entropy.fast_math import Math


def _grid():
  x = np.concatenate([np.linspace(-100, 100, 20001), np.geomspace(1e-8, 1e3, 500)])
  return jnp.asarray(np.concatenate([x, -x]), jnp.float32)


def test_tanh_absolute_error():
  x = _grid()
  got = np.asarray(Math(interpret=True).tanh(x), np.float64)
  np.testing.assert_allclose(got, np.tanh(np.asarray(x, np.float64)), rtol=0, atol=3e-7)


def test_exp_relative_error():
  x = jnp.asarray(np.linspace(-80, 80, 16001), jnp.float32)
  got = np.asarray(Math(interpret=True).exp(x), np.float64)
  np.testing.assert_allclose(got, np.exp(np.asarray(x, np.float64)), rtol=2e-5)


def test_special_values():
  m = Math(interpret=True)
  x = jnp.asarray([jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.float32)
  np.testing.assert_array_equal(np.asarray(m.tanh(x)), [1.0, -1.0, np.nan, 0.0])
  np.testing.assert_array_equal(np.asarray(m.exp(x)), [np.inf, 0.0, np.nan, 1.0])


def test_other_dtypes_use_jnp():
  x = jnp.linspace(-3, 3, 7, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(Math().tanh(x)), np.asarray(jnp.tanh(x)))
  np.testing.assert_array_equal(np.asarray(Math().exp(x)), np.asarray(jnp.exp(x)))
