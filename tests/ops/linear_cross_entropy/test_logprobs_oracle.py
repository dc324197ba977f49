"""`token_logprobs` on every CPU-runnable backend against float64 NumPy (`helpers.numpy_token_logprobs` and
`helpers.numpy_token_logprobs_grads`, which share no code with the library): log p(target), entropy and the
gradients of e, c and bias, with temperature, softcap, bias, shift and custom ignore_index (0 and V - 1)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax
from cce_jax import PallasGpuConfig
from cce_jax import XlaChunkedConfig
from tests.ops.linear_cross_entropy import helpers

D, V = 24, 301  # D a multiple of no block_d but 8, V prime

BACKENDS = {
    "reference": dict(implementation="reference"),
    "xla_chunked_small_tiles": dict(implementation="xla_chunked", config=XlaChunkedConfig(block_n=8, block_v=96)),
    "xla_chunked_default": dict(implementation="xla_chunked"),
    # Tiles that divide none of the shapes, three vocabulary splits, a moved-back last D chunk.
    "pallas_gpu_interpret": dict(implementation="pallas_gpu", interpret=True,
                                 config=PallasGpuConfig(block_n=16, block_v=64, block_d=16, num_splits=3)),
}

CASES = {  # name: (batch shape, ignore_index, options)
    "plain": ((37,), helpers.IGNORE, {}),
    "temperature_softcap_bias": ((37,), helpers.IGNORE, dict(temperature=0.7, softcap=5.0, bias=True)),
    "ignore_zero_shift": ((3, 13), 0, dict(temperature=1.3, shift=2)),
    "ignore_last_softcap_bias": ((37,), V - 1, dict(softcap=3.0, bias=True)),
}


def _inputs(seed, batch_shape, ignore_index, bias):
  """Random (e, c, bias, targets): scored targets in [0, V) other than ignore_index, every fifth one ignored."""
  e, c, _, b = helpers.make_inputs(seed, batch_shape, D, V, bias=bias)
  t = np.asarray(jax.random.randint(jax.random.key(seed + 1), batch_shape, 0, V - 1))
  if ignore_index == 0:
    t = t + 1
  t = np.where(np.arange(t.size).reshape(batch_shape) % 5 == 2, ignore_index, t)
  return e, c, b, jnp.asarray(t, jnp.int32)


def _logprobs_and_grads(backend, e, c, b, targets, g_logp, g_entropy, **options):
  """(logp, entropy) of the backend and the gradients (e, c[, bias]) of Σ g_logp·logp + Σ g_entropy·entropy."""
  def objective(params):
    logp, ent = cce_jax.token_logprobs(params["e"], params["c"], targets, bias=params.get("bias"),
                                       return_entropy=True, **BACKENDS[backend], **options)
    return jnp.sum(logp * g_logp) + jnp.sum(ent * g_entropy), (logp, ent)

  params = {"e": e, "c": c} | ({} if b is None else {"bias": b})
  (_, (logp, ent)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  return logp, ent, grads


@pytest.mark.parametrize("backend,case", list(itertools.product(BACKENDS, CASES)))
def test_logprobs_entropy_and_gradients_match_numpy(backend, case):
  batch_shape, ignore_index, options = CASES[case]
  options = dict(options)
  e, c, b, targets = _inputs(sorted(CASES).index(case), batch_shape, ignore_index, options.pop("bias", False))
  ks = jax.random.split(jax.random.key(99))
  g_logp = jax.random.uniform(ks[0], batch_shape, minval=-1.5, maxval=1.5)
  g_entropy = jax.random.uniform(ks[1], batch_shape, minval=-1.5, maxval=1.5)
  logp, ent, grads = _logprobs_and_grads(backend, e, c, b, targets, g_logp, g_entropy, ignore_index=ignore_index,
                                         **options)
  kw = dict(bias=b, ignore_index=ignore_index, **options)
  want_logp, want_ent = helpers.numpy_token_logprobs(e, c, targets, **kw)
  want_de, want_dc, want_db = helpers.numpy_token_logprobs_grads(e, c, targets, g_logp, g_entropy, **kw)

  assert logp.shape == ent.shape == batch_shape and logp.dtype == ent.dtype == jnp.float32
  ignored = helpers.numpy_shifted_targets(targets, options.get("shift", 0), ignore_index) == ignore_index
  assert ignored.any() and not ignored.all()
  np.testing.assert_array_equal(np.asarray(logp)[ignored], 0.0)  # exactly 0 where ignored or shifted out
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)  # every position, ignored ones included
  assert helpers.rel_err(grads["e"], want_de) <= helpers.F32_RTOL
  assert helpers.rel_err(grads["c"], want_dc) <= helpers.F32_RTOL
  if b is not None:
    assert helpers.rel_err(grads["bias"], want_db) <= helpers.F32_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_targets_give_nan_logprobs_only(backend):
  """With ignore_index=0, targets -100, -1 and V are out of range: NaN log-probs there, finite entropies
  everywhere, 0 exactly where the target is 0; without return_entropy the same log-probs alone."""
  e, c, b, targets = _inputs(7, (12,), 0, bias=True)
  targets = targets.at[1].set(-100).at[4].set(V).at[6].set(-1).at[9].set(0)
  kw = dict(bias=b, ignore_index=0, temperature=0.9, **BACKENDS[backend])
  logp, ent = cce_jax.token_logprobs(e, c, targets, return_entropy=True, **kw)
  bad = np.isin(np.arange(12), [1, 4, 6])
  np.testing.assert_array_equal(np.isnan(np.asarray(logp)), bad)
  assert np.isfinite(np.asarray(ent)).all()
  want_logp, want_ent = helpers.numpy_token_logprobs(e, c, targets, bias=b, ignore_index=0, temperature=0.9)
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)  # NaN where NaN, 0 at position 9
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cce_jax.token_logprobs(e, c, targets, **kw), logp)


def test_numpy_oracle_gradients_match_finite_differences():
  """The oracle's analytic gradients against central differences of its own float64 forward (tiny problem)."""
  rng = np.random.default_rng(0)
  e, c, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(7, 4)), rng.normal(size=(7,))
  targets = np.array([[3, 0, 6], [0, 2, 5]])
  g_logp, g_entropy = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
  kw = dict(temperature=0.8, softcap=2.0, ignore_index=0, shift=1)

  def value(e, c, b):
    logp, ent = helpers.numpy_token_logprobs(e, c, targets, bias=b, **kw)
    return np.sum(g_logp * logp) + np.sum(g_entropy * ent)

  analytic = helpers.numpy_token_logprobs_grads(e, c, targets, g_logp, g_entropy, bias=b, **kw)
  params = [e, c, b]
  for k, x in enumerate(params):
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      shifted = []
      for sign in (1.0, -1.0):
        xs = x.copy()
        xs[idx] += sign * 1e-6
        shifted.append(value(*(xs if m == k else p for m, p in enumerate(params))))
      numeric[idx] = (shifted[0] - shifted[1]) / 2e-6
    np.testing.assert_allclose(analytic[k], numeric, rtol=1e-6, atol=1e-8)
