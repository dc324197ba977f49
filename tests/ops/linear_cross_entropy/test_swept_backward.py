"""The low-memory filtered backward (`PallasGpuConfig.low_memory`, `swept_backward`): in the interpreter on CPU,
compiled on a GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax
from cce_jax import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy import keep_masks
from cce_jax.ops.linear_cross_entropy import mosaic_forward
from cce_jax.ops.linear_cross_entropy import pallas_gpu
from cce_jax.ops.linear_cross_entropy import pallas_spec
from cce_jax.ops.linear_cross_entropy import swept_backward
from tests.ops.linear_cross_entropy import helpers

# Tiles that divide none of the shapes below; dense_backward_above=1: the default mode always skips tiles too.
CFG = PallasGpuConfig(block_n=16, block_v=32, block_d=16, grad_block_d=16, grad_block_n=16, num_splits=2,
                      dense_backward_above=1.0, low_memory=False)


def _grads(e, c, targets, bias, config, interpret=True, **kw):
  f = lambda e, c, b: cce_jax.linear_cross_entropy(e, c, targets, bias=b, implementation="pallas_gpu",
                                                   config=config, interpret=interpret, **kw)
  return jax.value_and_grad(f, argnums=(0, 1, 2) if bias is not None else (0, 1))(e, c, bias)


@pytest.mark.parametrize("buffer_tiles", [1, 3, 9, None])
@pytest.mark.parametrize("filter_eps", [1e-30, "auto"])
def test_low_memory_gives_the_tile_skipping_gradients(buffer_tiles, filter_eps):
  """Any buffer size (one tile per window; runs of a vocabulary or token tile split over windows; one window)
  gives the default tile-skipping backward's loss and gradients, bias included; with nothing filtered, the
  full gradient."""
  e, c, targets, bias = helpers.make_inputs(50, (70,), 40, 700, bias=True, regime="peaked", ignore_frac=0.1)
  kw = dict(softcap=5.0, filter_eps=filter_eps)
  low = dataclasses.replace(CFG, low_memory=True,
                            backward_buffer_bytes=buffer_tiles and buffer_tiles * 16 * 32 * 4)
  want = _grads(e, c, targets, bias, CFG, **kw)
  got = _grads(e, c, targets, bias, low, **kw)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if filter_eps == 1e-30:
    f = lambda e, c, b: cce_jax.linear_cross_entropy(e, c, targets, bias=b, softcap=5.0, implementation="reference")
    for a, r in zip(got[1], jax.grad(f, argnums=(0, 1, 2))(e, c, bias)):
      assert helpers.rel_err(a, r) < 1e-5


@pytest.mark.parametrize("block_n,grad_block_n", [(16, 32), (32, 16)])
def test_backward_token_tile_differs_from_the_forward(block_n, grad_block_n):
  """The backward's token tile (grad_block_n) coarser or finer than the forward's (the Triton forward's tile
  values are regridded): the same gradients as the default mode, and with nothing filtered the full ones."""
  e, c, targets, bias = helpers.make_inputs(54, (75,), 40, 500, bias=True, regime="peaked", ignore_frac=0.1)
  cfg = dataclasses.replace(CFG, block_n=block_n, grad_block_n=grad_block_n)
  low = dataclasses.replace(cfg, low_memory=True, backward_buffer_bytes=5 * 16 * 32 * 4)
  for eps in ("auto", 1e-30):
    want = _grads(e, c, targets, bias, dataclasses.replace(CFG, grad_block_n=block_n), softcap=5.0, filter_eps=eps)
    for config in (cfg, low):
      got = _grads(e, c, targets, bias, config, softcap=5.0, filter_eps=eps)
      np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
      for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_regrid_rows():
  """A token-tile keep mask on finer or coarser tiles: kept wherever an old tile sharing a row is."""
  rng = np.random.default_rng(1)
  n = 100
  keep = rng.uniform(size=(7, 5)) < 0.3  # 16-row tiles
  rows = np.repeat(keep, 16, axis=0)[:n]  # per row
  for new in (4, 8, 16, 32, 64, 128):
    tiles = -(-n // new)
    want = np.pad(rows, ((0, tiles * new - n), (0, 0))).reshape(tiles, new, 5).any(axis=1)
    np.testing.assert_array_equal(np.asarray(keep_masks.regrid_rows(jnp.asarray(keep), 16, new, n)), want)


def test_low_memory_is_deterministic_and_skips_tiles():
  e, c, targets, _ = helpers.make_inputs(51, (96,), 64, 1000, regime="peaked")
  e = e + 2.0 * c[targets]  # most tiles fall below eps
  low = dataclasses.replace(CFG, low_memory=True, backward_buffer_bytes=5 * 16 * 32 * 4)
  spec = pallas_spec.make(None, 1.0, False, False, low, False, 2.0 ** -12, True)
  (lse, *_), residuals = pallas_gpu._stats_fwd(spec, e, c, None, targets)
  keep = np.asarray(keep_masks.with_forced_tiles(spec, residuals[-1], targets, lse, jnp.ones_like(lse), 1000))
  assert residuals[-1].shape == (6, 32)  # the forward's keep mask
  p = np.array(jax.nn.softmax(e @ c.T, axis=-1))
  p[np.arange(96), np.asarray(targets)] = 1.0  # a target's tile is always computed
  p = np.pad(p, ((0, 0), (0, 1024 - 1000)))
  need = p.reshape(6, 16, 32, 32).max(axis=(1, 3)) >= 2.0 ** -12
  assert (keep >= need).all()
  assert keep.mean() < 0.75
  one, two = (_grads(e, c, targets, None, low)[1] for _ in range(2))
  for a, b in zip(one, two):
    np.testing.assert_array_equal(a, b)


def _needed_tiles(e, c, targets, softcap, bn, bv, eps=2.0 ** -12):
  """[N tiles, V tiles]: tiles with a softmax entry >= eps (fp32 reference) or a row's target."""
  z = jnp.dot(e.astype(jnp.float32), c.astype(jnp.float32).T, precision="highest")
  s = softcap * jnp.tanh(z / softcap) if softcap else z
  p = np.array(jax.nn.softmax(s, axis=-1))
  n, v = p.shape
  ok = np.asarray(targets) >= 0
  p[np.arange(n)[ok], np.asarray(targets)[ok]] = 1.0
  p[~ok] = 0.0
  p = np.pad(p, ((0, -n % bn), (0, -v % bv)))
  return p.reshape(p.shape[0] // bn, bn, p.shape[1] // bv, bv).max(axis=(1, 3)) >= eps


def _keep_base(e, c, targets, softcap, cfg, interpret=True):
  spec = pallas_spec.make(softcap, 1.0, False, False, cfg, False, 2.0 ** -12, interpret)
  return np.asarray(jax.jit(lambda e, c: pallas_gpu._stats_fwd(spec, e, c, None, targets)[1][-1])(e, c))


def test_triton_keep_mask_bounds_the_needed_tiles():
  """The Triton forward's tile values give a keep mask that holds every needed tile; ignored rows add none."""
  e, c, targets, _ = helpers.make_inputs(52, (96,), 64, 1000, regime="peaked", ignore_frac=0.2)
  e = e + 2.0 * c[jnp.maximum(targets, 0)]  # most tiles fall below eps
  keep = _keep_base(e, c, targets, 30.0, dataclasses.replace(CFG, low_memory=True))
  need = _needed_tiles(e, c, targets, 30.0, 16, 32)
  assert keep.shape == need.shape
  assert (keep >= need).all() and need.mean() < keep.mean() < 0.75


@pytest.mark.parametrize("bn,bv", [(16, 128), (64, 256), (256, 128)])
def test_keep_from_codes_decodes_the_layout(bn, bv):
  """`_keep_from_codes` against a brute-force decode: row r needs 128-tile k iff its code allows d >= lse - ref."""
  rng = np.random.default_rng(0)
  n, v, splits, per_consumer = 300, 2500, 3, 4  # 20 tiles of 128, 24 slots: the last split partly empty
  d = rng.uniform(-1.0, 2.0, (20, n))
  lse_minus_ref = rng.uniform(-0.5, 1.5, (n,))
  reference = jnp.asarray(np.where(rng.uniform(size=n) < 0.1, np.inf, 1.0))
  d = np.where(np.isinf(np.asarray(reference))[None, :], -np.inf, d)
  lse = reference + lse_minus_ref
  codes = helpers.numpy_pack_codes(d, splits, per_consumer, mosaic_forward.CODE_LEVELS)
  keep = np.asarray(keep_masks.from_codes((codes, per_consumer), lse, reference, bn, bv, v))
  code = sum((d >= level).astype(np.int32) for level in mosaic_forward.CODE_LEVELS)
  upper = np.asarray(mosaic_forward.CODE_UPPER)[code]
  row_need = np.isfinite(np.asarray(reference))[None, :] & (upper + 1e-3 >= np.asarray(lse - reference)[None, :])
  nt, vt = -(-n // bn), -(-v // bv)
  row_need = np.pad(row_need, ((0, vt * bv // 128 - 20), (0, nt * bn - n)))
  want = row_need.reshape(vt, bv // 128, nt, bn).any(axis=(1, 3)).T
  np.testing.assert_array_equal(keep, want)
  # and the codes are a bound: every (row, tile) with d >= lse - ref is kept
  assert (row_need[:20, :n] >= (d >= np.asarray(lse - reference)[None, :])).all()


def test_capacity():
  cfg = dataclasses.replace(CFG, low_memory=True)
  assert cfg.buffer_bytes == 1 << 23 and CFG.buffer_bytes == 1 << 27
  assert swept_backward.capacity(dataclasses.replace(cfg, backward_buffer_bytes=1), 5, 7, 4) == 1
  assert swept_backward.capacity(cfg, 5, 7, 4) == 35


def test_config_rejects_bad_low_memory():
  with pytest.raises(ValueError, match="low_memory"):
    PallasGpuConfig(low_memory=1)


@pytest.mark.parametrize("bad", [0, 48, True, 16.0, None])
def test_config_grad_block_n(bad):
  with pytest.raises(ValueError, match="grad_block_n"):
    PallasGpuConfig(grad_block_n=bad)
  assert PallasGpuConfig(low_memory=True).clamped(20, 100, 8).grad_block_n == 16


def test_low_memory_is_off_by_default():
  """The default is the backward with a dense fallback (robust where most tiles are kept); low_memory is opt-in."""
  assert PallasGpuConfig().low_memory is False
  with pytest.raises(ValueError, match="low_memory must be a bool"):
    PallasGpuConfig(low_memory=None)


# ---- compiled on a GPU -------------------------------------------------------------------------------------------

needs_hopper = pytest.mark.skipif(not helpers.has_hopper(), reason="needs an sm_90 GPU")

@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("n,v,splits,block_n,block_v", [(37, 1003, 3, 16, 128), (300, 600, 1, 256, 256),
                                                         (1030, 20056, 4, 128, 128)])
def test_mosaic_keep_mask_bounds_the_needed_tiles(n, v, splits, block_n, block_v):
  """The Mosaic forward's row codes give a keep mask that holds every needed tile and, on peaked inputs, not
  many more (compiled only: the GPU interpreter can stall on this kernel with two CPU cores)."""
  e, c, targets, _ = helpers.make_inputs(53, (n,), 64, v, regime="peaked", ignore_frac=0.2)
  e, c = e.astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  cfg = PallasGpuConfig(block_n=block_n, block_v=block_v, num_splits=splits, forward_kernel="mosaic",
                        low_memory=True, grad_block_n=block_n)
  keep = _keep_base(e, c, targets, 30.0, cfg, interpret=False)
  need = _needed_tiles(e, c, targets, 30.0, block_n, block_v)
  assert keep.shape == need.shape
  assert (keep >= need).all()
  assert keep.mean() <= need.mean() + 0.1


@pytest.mark.gpu
@needs_hopper
def test_low_memory_through_the_mosaic_forward():
  e, c, targets, _ = helpers.make_inputs(54, (90,), 64, 1000, regime="peaked")
  e, c = e.astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  cfg = PallasGpuConfig(block_n=64, block_v=128, forward_kernel="mosaic", low_memory=False)
  want = _grads(e, c, targets, None, dataclasses.replace(cfg, dense_backward_above=1.0), softcap=30.0,
                interpret=False)
  got = _grads(e, c, targets, None, dataclasses.replace(cfg, low_memory=True), softcap=30.0,
                 interpret=False)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(got[1], want[1]):
    assert helpers.rel_err(a, b) < 1e-2




@pytest.mark.gpu
@pytest.mark.skipif(not helpers.has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("regime", ["peaked", "random"])
@pytest.mark.parametrize("softcap", [30.0, None])
def test_compiled_low_memory_matches_the_default(regime, softcap):
  """Compiled (the Mosaic forward on Hopper): the default tile-skipping backward's loss and gradients, windows
  of 64 tiles, run to run bitwise identical."""
  from benchmarks.linear_cross_entropy import inputs
  n, d, v = 2048, 512, 32000
  e, c, targets = inputs.make_inputs(n, d, v, jnp.bfloat16, regime)
  cfg = PallasGpuConfig.for_shape(n, v, d, softcap=softcap, filtered=True)
  assert cfg.grad_block_n == 32  # both modes skip the same tiles up to their bounds
  grads = lambda config: helpers.pallas_value_and_grad(e, c, targets, softcap, config, filter_eps="auto")
  want = grads(dataclasses.replace(cfg, dense_backward_above=1.0))
  low = dataclasses.replace(cfg, low_memory=True, backward_buffer_bytes=64 * 128 * 128 * 2)
  got, again = grads(low), grads(low)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b, r in zip(got[1], again[1], want[1]):
    np.testing.assert_array_equal(a, b)
    assert helpers.rel_err(a, r) < 2e-3


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("shape", ["gemma2_2b", "llama3_8b_4k"])
def test_low_memory_loss_and_gradient_temporaries_under_16_mib(shape):
  """low_memory's compiled loss + gradient at the benchmark shapes: at most 16 MiB of temporaries beyond its
  inputs and the gradients (naive XLA: 3-20 GB)."""
  from benchmarks.linear_cross_entropy import inputs
  n, d, v, softcap = inputs.SHAPES[shape]
  cfg = dataclasses.replace(PallasGpuConfig.for_shape(n, v, d, softcap=softcap, filtered=True), low_memory=True)
  f = lambda e, c, t: cce_jax.linear_cross_entropy(e, c, t, softcap=softcap, implementation="pallas_gpu",
                                                   config=cfg, filter_eps="auto")
  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((v, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((n,), jnp.int32))
  compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
  assert compiled.memory_analysis().temp_size_in_bytes <= 16 * 2**20
