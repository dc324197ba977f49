"""implementation="xla_fused": the reduced loss with its gradient formed in the forward pass, against the
materialised reference on fresh random inputs (odd shapes, every option that a reduced loss takes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax
from cce_jax import XlaChunkedConfig
from tests.ops.linear_cross_entropy import helpers

# block_n=7 divides none of the token counts below: the last block is padded.
SMALL = XlaChunkedConfig(block_n=7, block_v=1)


def _loss_and_grads(implementation, e, c, targets, bias, weights, **kw):
  def f(e, c, bias, weights):
    return cce_jax.linear_cross_entropy(e, c, targets, bias=bias, weights=weights, implementation=implementation,
                                        **kw)
  argnums = tuple(k for k, x in enumerate((e, c, bias, weights)) if x is not None)
  return jax.value_and_grad(f, argnums=argnums)(e, c, bias, weights)


@pytest.mark.parametrize("options", [
    dict(),
    dict(reduction="sum"),
    dict(softcap=3.0, bias=True),
    dict(label_smoothing=0.1, z_loss=1e-3),
    dict(weights=True, shift=1),
    dict(weights=True, reduction="sum", softcap=2.0),
    dict(exact=True, bias=True, label_smoothing=0.2),
])
@pytest.mark.parametrize("batch_shape", [(23,), (3, 11)])
def test_matches_reference(options, batch_shape):
  options = dict(options)
  seed = len(str(options)) + len(batch_shape)
  e, c, targets, bias = helpers.make_inputs(seed, batch_shape, 24, 301, ignore_frac=0.2,
                                            bias=options.pop("bias", False))
  weights = None
  if options.pop("weights", False):
    weights = jax.random.uniform(jax.random.key(seed), batch_shape, minval=0.5, maxval=2.0)
  got = _loss_and_grads("xla_fused", e, c, targets, bias, weights, config=SMALL, **options)
  want = _loss_and_grads("reference", e, c, targets, bias, weights, **options)
  np.testing.assert_allclose(got[0], want[0], rtol=helpers.F32_RTOL)
  for g, w in zip(got[1], want[1]):
    assert helpers.rel_err(g, w) < helpers.F32_RTOL


def test_bf16_default_blocks_and_eval():
  """bf16 inputs with the default block; without differentiation only the loss is computed, and it agrees."""
  e, c, targets, _ = helpers.make_inputs(5, (64,), 32, 1000, jnp.bfloat16, regime="peaked")
  got = _loss_and_grads("xla_fused", e, c, targets, None, None)
  want = _loss_and_grads("reference", *helpers.upcast((e, c)), targets, None, None)
  naive = jax.value_and_grad(lambda e, c: helpers.naive_lowp_loss(e, c, targets), argnums=(0, 1))(e, c)
  assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
  assert abs(float(got[0]) - float(want[0])) < 1e-5 * abs(float(want[0]))
  for g, w, nv in zip(got[1], want[1], naive[1]):
    assert helpers.rel_err(g, w) <= helpers.LOWP_FACTOR * helpers.rel_err(nv, w) + helpers.LOWP_MARGIN
  loss_only = cce_jax.linear_cross_entropy(e, c, targets, implementation="xla_fused")
  assert float(loss_only) == float(got[0])


def test_grad_scales_with_the_cotangent_and_under_jit_vmap():
  e, c, targets, _ = helpers.make_inputs(6, (4, 9), 16, 77)
  f = lambda e, c, t: cce_jax.linear_cross_entropy(e, c, t, implementation="xla_fused", config=SMALL)
  g3 = jax.grad(lambda e, c: 3.0 * f(e, c, targets), argnums=(0, 1))(e, c)
  g1 = jax.grad(f, argnums=(0, 1))(e, c, targets)
  for a, b in zip(g3, g1):
    np.testing.assert_allclose(a, 3.0 * b, rtol=1e-6)
  per_row = jax.jit(jax.vmap(jax.grad(f), in_axes=(0, None, 0)))(e, c, targets)
  ref = jax.vmap(jax.grad(lambda e, c, t: cce_jax.linear_cross_entropy(e, c, t, implementation="reference")),
                 in_axes=(0, None, 0))(e, c, targets)
  assert helpers.rel_err(per_row, ref) < helpers.F32_RTOL


def test_bad_targets_give_nan_and_ignored_nan_rows_do_not():
  """An out-of-range target makes the loss and gradients NaN; a NaN hidden state at an ignored position leaves the
  loss and dE finite (as in the reference, dC = dZ.T @ e still meets it: 0 * NaN)."""
  e, c, targets, _ = helpers.make_inputs(7, (12,), 16, 50)
  bad = targets.at[3].set(50)
  loss, (de, dc) = _loss_and_grads("xla_fused", e, c, bad, None, None, config=SMALL)
  assert np.isnan(float(loss)) and np.isnan(np.asarray(dc)).any()
  ignored = targets.at[4].set(-100)
  e_nan = e.at[4].set(jnp.nan)
  loss, (de, _) = _loss_and_grads("xla_fused", e_nan, c, ignored, None, None, config=SMALL)
  want = _loss_and_grads("reference", e_nan, c, ignored, None, None)
  np.testing.assert_allclose(loss, want[0], rtol=helpers.F32_RTOL)
  assert np.isfinite(np.asarray(de)).all() and not np.asarray(de[4]).any()


def test_refuses_what_it_cannot_compute():
  e, c, targets, _ = helpers.make_inputs(8, (10,), 16, 40)
  run = lambda **kw: cce_jax.linear_cross_entropy(e, c, targets, implementation="xla_fused", **kw)
  with pytest.raises(ValueError, match="reduction"):
    run(reduction="none")
  with pytest.raises(ValueError, match="return_lse"):
    run(return_lse=True)
  with pytest.raises(ValueError, match="does not filter"):
    run(filter_eps=1e-3)
  with pytest.raises(ValueError, match="reduced losses only"):
    cce_jax.token_logprobs(e, c, targets, implementation="xla_fused")
  assert float(run(filter_eps=None)) == float(run())
