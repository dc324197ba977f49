"""The dense backward with the Mosaic GPU dZ kernel: in the GPU interpreter on CPU (CI), compiled on an sm_90 GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.linear_cross_entropy import inputs
import cce_jax
from cce_jax import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import mosaic_dlogits
from cce_jax.ops.linear_cross_entropy import xla_backward
from cce_jax.ops.linear_cross_entropy import xla_chunked
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig
from tests.ops.linear_cross_entropy import helpers


_TILES = XlaChunkedConfig(16, 128)  # of the XLA forward and backward that the kernel is checked against


def _residuals_and_cotangents(seed, n, d, v, spec):
  e, c, targets, _ = helpers.make_inputs(seed, (n,), d, v)
  e, c = e.astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  targets = targets.at[1].set(-100)
  (lse, _, _, mean), res = xla_chunked._stats_fwd(spec, _TILES, e, c, None, targets)
  ks = jax.random.split(jax.random.key(seed + 1), 4)
  cots = tuple(jax.random.normal(k, (n,)) for k in ks)
  cots = tuple(g.at[1].set(0.0) for g in cots)  # the ignored token has no cotangent
  return res, cots


# Token blocks that do not divide N (the last one moved back), vocabulary blocks that leave a remainder block,
# N and V not multiples of 8, every per-token cotangent, softcap and temperature.
@pytest.mark.parametrize("n,d,v,block_n,block_v,softcap,inv_temp,with_sum,with_mean", [
    (61, 64, 1003, 24, 256, None, 1.0, False, False),
    (40, 128, 776, 40, 512, 5.0, 1.0, True, False),
    (37, 32, 520, 16, 256, None, 1 / 0.7, False, True),
    (50, 64, 264, 48, 264, 2.5, 1.0, True, True),
])
def test_dense_backward_matches_the_xla_backward(n, d, v, block_n, block_v, softcap, inv_temp, with_sum, with_mean):
  spec = base.StatsSpec(softcap=softcap, inv_temperature=inv_temp, with_sum=with_sum, with_mean=with_mean,
                        exact=True, filter_eps=None)
  res, cots = _residuals_and_cotangents(n + v, n, d, v, spec)
  got = mosaic_dlogits.dense_backward(spec, res, cots, block_n=block_n, block_v=block_v, splits=2,
                                      approx_math=True, interpret=True)
  want = xla_backward.backward(spec, _TILES, res, cots)
  assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
  assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
  for g, w in zip(got[:2], want[:2]):
    # Both form dZ in fp32 and round it to bf16 before fp32-accumulated GEMMs: they differ by the summation order
    # and by the rare dZ entry whose rounding flips (measured <= 1e-5; g_sum's term 1% off moves them by 1e-2).
    assert helpers.rel_err(g, w) < 1e-4


@pytest.mark.parametrize("options", [dict(exact=True), dict(filter_eps=None, softcap=5.0, label_smoothing=0.1,
                                                                 z_loss=1e-3, reduction="sum")])
def test_op_with_the_mosaic_backward(options):
  e, c, targets, _ = helpers.make_inputs(8, (61,), 64, 997)
  e, c = e.astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  targets = targets.at[2].set(-100)
  cfg = PallasGpuConfig(dense_backward_kernel="mosaic", dense_block_v=256, dense_block_elements=256 * 24,
                        low_memory=False)
  f = lambda impl, **kw: lambda e, c: cce_jax.linear_cross_entropy(e, c, targets, implementation=impl, **options,
                                                                   **kw)
  got = jax.grad(f("pallas_gpu", config=cfg, interpret=True), argnums=(0, 1))(e, c)
  ref = jax.grad(f("reference"), argnums=(0, 1))(*helpers.upcast((e, c)))
  naive = jax.grad(f("reference"), argnums=(0, 1))(e, c)
  for g, r, b in zip(got, ref, naive):
    assert helpers.rel_err(g, r) <= helpers.LOWP_FACTOR * helpers.rel_err(b, r) + helpers.LOWP_MARGIN


def test_forced_mosaic_backward_rejects_a_bias():
  e, c, targets, bias = helpers.make_inputs(9, (16,), 64, 264, bias=True)
  e, c, bias = (x.astype(jnp.bfloat16) for x in (e, c, bias))
  cfg = PallasGpuConfig(dense_backward_kernel="mosaic", low_memory=False)
  loss = lambda e: cce_jax.linear_cross_entropy(e, c, targets, bias=bias, exact=True, implementation="pallas_gpu",
                                                config=cfg, interpret=True)
  with pytest.raises(ValueError, match="bias"):
    jax.grad(loss)(e)
  with pytest.raises(ValueError, match="dense_backward_kernel"):
    PallasGpuConfig(dense_backward_kernel="triton")


# ---- compiled on a Hopper GPU ------------------------------------------------------------------------------------

needs_hopper = pytest.mark.skipif(not helpers.has_hopper(), reason="needs an sm_90 GPU")


def _grads(e, c, targets, softcap, kernel, **kw):
  """The recomputing backward with the dense dlogits `kernel` (not the gradient formed in the forward pass)."""
  cfg = PallasGpuConfig(dense_backward_kernel=kernel, low_memory=False, forward_gradient="off")
  return helpers.pallas_value_and_grad(e, c, targets, softcap, cfg, **kw)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("n,d,v,softcap", [(1000, 2304, 33008, 30.0), (515, 4096, 20000, None),
                                           (9000, 256, 16645, None)])
@pytest.mark.parametrize("mode", [dict(exact=True), dict(filter_eps=None)])
def test_compiled_mosaic_backward_matches_xla_and_repeats_bitwise(n, d, v, softcap, mode):
  e, c, targets = inputs.make_inputs(n, d, v, jnp.bfloat16, "random", seed=n)
  runs = [_grads(e, c, targets, softcap, "mosaic", **mode) for _ in range(2)]
  xla = _grads(e, c, targets, softcap, "xla", **mode)
  for a, b, x in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), jax.tree.leaves(xla)):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    assert helpers.rel_err(a, x) < 1e-2


@pytest.mark.parametrize("eps,above", [(1e-2, 0.0), (2.0, 0.0), (1e-2, 1e-6)])
def test_filtered_mode_dense_fallback_is_the_full_gradient(eps, above):
  """The dense backward computes every tile, so with filtering it zeroes nothing: always dense (above=0), and as
  the fallback the device chooses when more than `above` of the tiles are kept (the `lax.cond`), the gradient is
  filter_eps=None's bitwise, also where a filter would have dropped rows of tiles (peaked logits)."""
  e, c, targets, _ = helpers.make_inputs(10, (40,), 64, 1000, regime="peaked")
  e, c = e.astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  cfg = PallasGpuConfig(dense_backward_above=above, dense_backward_kernel="mosaic", dense_block_v=256,
                        low_memory=False, forward_gradient="off")
  f = lambda **kw: lambda e, c: cce_jax.linear_cross_entropy(e, c, targets, implementation="pallas_gpu", config=cfg,
                                                             interpret=True, **kw)
  got = jax.grad(f(filter_eps=eps), argnums=(0, 1))(e, c)
  full = jax.grad(f(filter_eps=None), argnums=(0, 1))(e, c)
  for g, u in zip(got, full):
    assert float(jnp.abs(u.astype(jnp.float32)).max()) > 0.0
    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(u.astype(jnp.float32)))
