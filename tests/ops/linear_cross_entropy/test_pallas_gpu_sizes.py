"""pallas_gpu at real sizes, compiled on an NVIDIA GPU (marked `gpu`; skipped elsewhere).

The CCE paper's Table-1 shape against the fp32 reference (filtered and exact), exact mode bitwise identical run
to run (and the filtered mode's tile-skipping backward), and a classifier with V·D > 2^31 elements (64-bit
offsets inside the kernels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.linear_cross_entropy import harness
from benchmarks.linear_cross_entropy import inputs
import cce_jax
from tests.ops.linear_cross_entropy import helpers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not helpers.has_gpu(), reason="needs an NVIDIA GPU"),
]

# Relative L2 error against the fp32 reference on the Table-1 shape, bf16 inputs (README: gradient filtering).
FILTERED_GRAD_RTOL = 5e-2
EXACT_GRAD_RTOL = 5e-3
LOSS_RTOL = 1e-4


def _loss_and_grads(e, c, targets, softcap, **kw):
  f = lambda e, c: cce_jax.linear_cross_entropy(e, c, targets, softcap=softcap, **kw)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(e, c)


def _reference(e, c, targets, softcap):
  with jax.default_matmul_precision("highest"):
    return _loss_and_grads(e.astype(jnp.float32), c.astype(jnp.float32), targets, softcap,
                           implementation="reference")


def _errors(out, ref):
  return [harness.rel_err(x, r) for x, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref))]


@pytest.fixture(scope="module")
def table1():
  n, d, v, softcap = inputs.SHAPES["gemma2_2b"]
  e, c, targets = inputs.make_inputs(n, d, v, jnp.bfloat16, "peaked", seed=1)
  return e, c, targets, softcap, _reference(e, c, targets, softcap)


@pytest.mark.parametrize("mode", ["filtered", "exact"])
def test_table1_shape_against_reference(table1, mode):
  e, c, targets, softcap, ref = table1
  kw = dict(exact=True) if mode == "exact" else dict(filter_eps="auto")
  out = _loss_and_grads(e, c, targets, softcap, implementation="pallas_gpu", **kw)
  err_loss, err_de, err_dc = _errors(out, ref)
  rtol = EXACT_GRAD_RTOL if mode == "exact" else FILTERED_GRAD_RTOL
  assert err_loss < LOSS_RTOL
  assert err_de < rtol and err_dc < rtol, (err_de, err_dc)


@pytest.mark.parametrize("mode", ["exact", "filtered"])
def test_bitwise_deterministic(mode):
  """Exact mode (dense GEMMs) and the filtered tile-skipping backward (no atomics) repeat bitwise."""
  e, c, targets = inputs.make_inputs(3000, 1000, 50021, jnp.bfloat16, "peaked", seed=2)
  tiles = cce_jax.PallasGpuConfig(dense_backward_above=1.0, low_memory=False)
  kw = dict(exact=True) if mode == "exact" else dict(filter_eps="auto", config=tiles)
  runs = [_loss_and_grads(e, c, targets, 30.0, implementation="pallas_gpu", **kw) for _ in range(2)]
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


@pytest.mark.parametrize("filter_eps", [None, "auto"])
def test_classifier_over_2_31_elements(filter_eps):
  n, d, v = 64, 8192, 262147
  assert v * d > 2**31
  e, c, targets = inputs.make_inputs(n, d, v, jnp.bfloat16, "peaked", seed=3)
  # The last vocabulary rows are the ones whose offsets overflow int32: make them matter.
  targets = targets.at[:8].set(jnp.arange(v - 8, v))
  ref = _reference(e, c, targets, None)
  out = _loss_and_grads(e, c, targets, None, implementation="pallas_gpu", filter_eps=filter_eps)
  err_loss, err_de, err_dc = _errors(out, ref)
  assert err_loss < LOSS_RTOL
  rtol = EXACT_GRAD_RTOL if filter_eps is None else FILTERED_GRAD_RTOL
  assert err_de < rtol and err_dc < rtol, (err_de, err_dc)
