"""The op's test base on the Pallas GPU kernels: in the interpreter on CPU (CI), compiled on an NVIDIA GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax
from cce_jax import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy import compact_backward
from cce_jax.ops.linear_cross_entropy import keep_masks
from cce_jax.ops.linear_cross_entropy import pallas_gpu
from cce_jax.ops.linear_cross_entropy import pallas_spec
from tests.ops.linear_cross_entropy import helpers
from tests.ops.linear_cross_entropy.test_base import LinearCrossEntropyTestBase



class TestPallasGpuInterpret(LinearCrossEntropyTestBase):
  """Small power-of-2 tiles that divide none of the odd test shapes, and several vocabulary splits."""

  implementation = "pallas_gpu"
  # dense_backward_above=1: the filtered backward always takes the tile-skipping kernel (the dense one is XLA's).
  extra = {"config": PallasGpuConfig(block_n=16, block_v=64, block_d=16, num_splits=3, dense_backward_above=1.0,
                                     low_memory=False),
           "interpret": True}


def _tile_filtered_grads(e, c, targets, eps, bn, bv):
  """jnp gradients of the mean cross-entropy with every (bn, bv) tile whose |softmax - onehot| < eps dropped."""
  e32, c32 = e.astype(jnp.float32), c.astype(jnp.float32)
  n, v = e.shape[0], c.shape[0]
  ds = jax.nn.softmax(e32 @ c32.T, axis=-1) - jax.nn.one_hot(targets, v)
  pad = (-n % bn, -v % bv)
  tiles = jnp.pad(jnp.abs(ds), ((0, pad[0]), (0, pad[1]))).reshape(-1, bn, (v + pad[1]) // bv, bv)
  keep = jnp.repeat(jnp.repeat(tiles.max(axis=(1, 3)) >= eps, bn, 0), bv, 1)[:n, :v]
  ds = jnp.where(keep, ds, 0.0) / n
  return ds @ c32, ds.T @ e32, keep.mean()


@pytest.mark.parametrize("threshold,expect", [(0.0, "full"), (0.02, "full"), (0.9, "tiles"), (1.0, "tiles")])
def test_filtered_backward_paths(threshold, expect):
  """The tile-skipping kernel gives the tile-filtered gradient, the dense GEMMs the full one; in between the
  runtime choice follows the fraction of tiles the bound keeps (here between 0.02 and 0.9)."""
  e, c, targets, _ = helpers.make_inputs(40, (96,), 128, 1000, regime="peaked")
  e, c = (e + 2.0 * c[targets]).astype(jnp.bfloat16), c.astype(jnp.bfloat16)  # most tiles fall below eps
  cfg = PallasGpuConfig(block_n=16, block_v=64, block_d=16, num_splits=2, dense_backward_above=threshold,
                        low_memory=False, grad_block_n=16)
  loss = lambda impl, **kw: lambda e, c: cce_jax.linear_cross_entropy(e, c, targets, implementation=impl, **kw)
  grads = jax.grad(loss("pallas_gpu", config=cfg, filter_eps="auto", interpret=True), argnums=(0, 1))(e, c)
  full = jax.grad(loss("reference"), argnums=(0, 1))(e.astype(jnp.float32), c.astype(jnp.float32))
  de, dc, kept = _tile_filtered_grads(e, c, targets, 2.0 ** -12, 16, 64)
  assert 0.02 < kept < 0.9
  assert helpers.rel_err(de, full[0]) > 0.1  # the filter matters here
  for g, r in zip(grads, full if expect == "full" else (de, dc)):
    assert helpers.rel_err(g, r) < 2e-2


def test_tile_keep_mask_bounds_the_kernel_test():
  """Every tile with a softmax entry >= filter_eps, or a live row's target, is kept, and little else (the per-row
  maxima are rounded up to bf16); peaked inputs skip most tiles."""
  e, c, targets, _ = helpers.make_inputs(41, (200,), 128, 2000, regime="peaked")
  e = e + 2.0 * c[targets]  # more confident still: most tiles fall below eps
  targets = targets.at[5].set(-100)
  # 11 tiles per split: row maxima stored in groups across splits
  cfg = PallasGpuConfig(block_n=16, block_v=64, block_d=16, num_splits=3, low_memory=False)
  eps = 2.0 ** -12
  spec = pallas_spec.make(None, 1.0, False, False, cfg, False, eps, True)
  (lse, *_), residuals = pallas_gpu._stats_fwd(spec, e, c, None, targets)
  valid = targets != -100
  keep = np.asarray(keep_masks.from_row_maxima(spec, residuals[-1], jnp.where(valid, targets, 0), lse,
                                               valid.astype(jnp.float32), 2000))
  p = np.array(jax.nn.softmax(e @ c.T, axis=-1))
  p[np.arange(200), np.asarray(targets)] = 1.0  # a target's tile is always computed
  p[~np.asarray(valid)] = 0.0
  n_tiles, v_tiles = keep.shape
  need = np.zeros_like(keep)
  for i in range(n_tiles):
    for j in range(v_tiles):
      need[i, j] = p[i * 16:(i + 1) * 16, j * 64:(j + 1) * 64].max() >= eps
  assert (keep >= need).all()
  assert keep.mean() < need.mean() + 0.02
  assert keep.mean() < 0.5


@pytest.mark.parametrize("filter_eps", [1e-30, "auto"])
def test_tile_skipping_backward_in_several_passes(filter_eps):
  """A dZ buffer of a few tiles: the kept tiles run in several passes (whole vocabulary tiles per pass) and give
  the single-pass gradients, bias included."""
  e, c, targets, bias = helpers.make_inputs(42, (70,), 40, 700, bias=True, regime="peaked")
  cfg = PallasGpuConfig(block_n=16, block_v=32, block_d=16, grad_block_d=16, num_splits=2, dense_backward_above=1.0,
                        low_memory=False)
  small = dataclasses.replace(cfg, backward_buffer_bytes=16 * 32 * 4 * 7)
  n_tiles, v_tiles = 5, 22
  assert compact_backward.capacity(small, n_tiles, v_tiles, 4) == 7 < n_tiles * v_tiles
  assert compact_backward.capacity(cfg, n_tiles, v_tiles, 4) == n_tiles * v_tiles

  def grads(config):
    f = lambda e, c, b: cce_jax.linear_cross_entropy(e, c, targets, bias=b, softcap=5.0, filter_eps=filter_eps,
                                                     implementation="pallas_gpu", config=config, interpret=True)
    return jax.grad(f, argnums=(0, 1, 2))(e, c, bias)

  one, several = grads(cfg), grads(small)
  for a, b in zip(one, several):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
  if filter_eps == 1e-30:  # nothing is filtered: the full gradient
    f = lambda e, c, b: cce_jax.linear_cross_entropy(e, c, targets, bias=b, softcap=5.0, implementation="reference")
    for a, r in zip(several, jax.grad(f, argnums=(0, 1, 2))(e, c, bias)):
      assert helpers.rel_err(a, r) < 1e-5


@pytest.mark.parametrize("filter_eps", [1e-30, "auto"])
def test_sorted_vocabulary_keeps_loss_and_gradients(filter_eps):
  e, c, targets, bias = helpers.make_inputs(43, (60,), 32, 500, bias=True, regime="peaked", ignore_frac=0.1)
  cfg = PallasGpuConfig(block_n=16, block_v=32, block_d=16, grad_block_d=16, num_splits=2, dense_backward_above=1.0,
                        low_memory=False)

  def run(impl, **kw):
    f = lambda e, c, b: cce_jax.linear_cross_entropy(e, c, targets, bias=b, softcap=5.0, implementation=impl, **kw)
    return jax.value_and_grad(f, argnums=(0, 1, 2))(e, c, bias)

  plain = run("pallas_gpu", config=cfg, filter_eps=filter_eps, interpret=True)
  ordered = run("pallas_gpu", config=dataclasses.replace(cfg, sort_vocabulary=True), filter_eps=filter_eps,
                interpret=True)
  ref = run("reference")
  np.testing.assert_allclose(ordered[0], plain[0], rtol=1e-6)
  tol = 1e-5 if filter_eps == 1e-30 else 5e-2
  for g, r in zip(ordered[1], ref[1]):
    assert helpers.rel_err(g, r) < tol


def test_sorted_vocabulary_clusters_the_kept_tiles():
  """A few entries that every token rates highly (frequent words) keep a tile each wherever they sit; sorted by
  mean logit they share a few tiles, so far fewer tiles are kept."""
  ks = jax.random.split(jax.random.key(44), 4)
  n, d, v = 96, 32, 2048
  u = jax.random.normal(ks[0], (d,)) / np.sqrt(d)
  frequent = jax.random.uniform(ks[1], (v,)) < 0.03
  c = jax.random.normal(ks[2], (v, d)) * 0.3 / np.sqrt(d) + jnp.where(frequent, 6.0, 0.0)[:, None] * u
  e = jax.random.normal(ks[3], (n, d)) * 0.5 + 2.0 * u * np.sqrt(d)
  targets = jnp.zeros((n,), jnp.int32)  # a frequent entry's tile is kept either way
  targets = targets + jnp.argmax(frequent)
  valid = jnp.ones((n,), bool)
  cfg = PallasGpuConfig(block_n=16, block_v=64, block_d=16, num_splits=2, low_memory=False)
  spec = pallas_spec.make(None, 1.0, False, False, cfg, False, 2.0 ** -12, True)

  def kept(c, targets):
    (lse, *_), residuals = pallas_gpu._stats_fwd(spec, e, c, None, targets)
    return float(jnp.mean(keep_masks.from_row_maxima(spec, residuals[-1], targets, lse, jnp.ones((n,)), v)))

  c_sorted, _, t_sorted = pallas_gpu._sorted_vocabulary(e, c, None, targets, valid)
  assert kept(c_sorted, t_sorted) < 0.5 * kept(c, targets)


@pytest.mark.parametrize("flat_loop", [False, True])
@pytest.mark.parametrize("block_n,block_v,block_d,splits", [(1, 1, 1, 1), (4, 8, 8, 5), (64, 512, 64, None)])
def test_interpret_any_tile_shape(block_n, block_v, block_d, splits, flat_loop):
  e, c, targets, bias = helpers.make_inputs(31, (13,), 20, 300, bias=True)
  kw = dict(bias=bias, softcap=3.0, label_smoothing=0.1, reduction="none")
  ref = cce_jax.linear_cross_entropy(e, c, targets, implementation="reference", **kw)
  cfg = PallasGpuConfig(block_n, block_v, block_d, num_splits=splits, flat_loop=flat_loop)
  out = cce_jax.linear_cross_entropy(e, c, targets, implementation="pallas_gpu", config=cfg, interpret=True,
                                     **kw)
  np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)
  lp_kw = dict(bias=bias, softcap=3.0, temperature=0.7, return_entropy=True)
  lp_ref = cce_jax.token_logprobs(e, c, targets, implementation="reference", **lp_kw)
  lp = cce_jax.token_logprobs(e, c, targets, implementation="pallas_gpu", config=cfg, interpret=True, **lp_kw)
  np.testing.assert_allclose(lp, lp_ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bad", [0, 3, 48, 2.0])
def test_config_rejects_non_powers_of_two(bad):
  with pytest.raises(ValueError, match="power of 2"):
    PallasGpuConfig(block_n=bad)
  with pytest.raises(ValueError, match="power of 2"):
    PallasGpuConfig(grad_block_d=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_config_rejects_bad_buffer(bad):
  with pytest.raises(ValueError, match="backward_buffer_bytes"):
    PallasGpuConfig(backward_buffer_bytes=bad)


@pytest.fixture
def highest_precision():
  """fp32 comparisons need IEEE fp32 dots: the GPU's default for f32 matmuls is TF32."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.gpu
@pytest.mark.skipif(not helpers.has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.usefixtures("highest_precision")
class TestPallasGpuCompiled(LinearCrossEntropyTestBase):
  """The same sweep through 'auto' on a GPU: compiled Triton kernels, default tiles (XLA below N, V, D = 16)."""

  implementation = "auto"
  extra = {}


@pytest.mark.gpu
@pytest.mark.skipif(not helpers.has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.usefixtures("highest_precision")
class TestPallasGpuCompiledSmallTiles(LinearCrossEntropyTestBase):
  """Compiled with the smallest tiles Triton's dot takes, so that edge blocks and splits are exercised."""

  implementation = "auto"
  extra = {"config": PallasGpuConfig(block_n=16, block_v=32, block_d=16, num_splits=3)}


@pytest.mark.gpu
@pytest.mark.skipif(not helpers.has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.usefixtures("highest_precision")
class TestPallasGpuCompiledTileSkipping(LinearCrossEntropyTestBase):
  """Compiled, with the filtered backward always in the tile-skipping kernel (never the dense fallback)."""

  implementation = "auto"
  extra = {"config": PallasGpuConfig(block_n=16, block_v=32, block_d=16, num_splits=3, dense_backward_above=1.0,
                                     low_memory=False)}


def test_default_config_heuristic():
  light, capped = PallasGpuConfig.for_shape(4096, 128256, 4096), PallasGpuConfig.for_shape(8192, 256000, 2304,
                                                                                           softcap=30.0)
  assert (light.num_warps, light.bwd_warps) == (4, 8)
  assert (capped.num_warps, capped.bwd_warps) == (8, 8)
  # Filtering: the forward also stores row maxima per tile, faster with 4 warps under a softcap too.
  assert PallasGpuConfig.for_shape(8192, 256000, 2304, softcap=30.0, filtered=True).num_warps == 4
  assert PallasGpuConfig(num_warps=2).bwd_warps == 2
  with pytest.raises(ValueError, match="backward_warps"):
    PallasGpuConfig(backward_warps=0)
