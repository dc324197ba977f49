"""The keep masks of the tile-skipping backwards (`keep_masks`) and what the forward writes for them, against NumPy
re-derivations on random inputs: a [token tile, vocabulary tile] is kept iff some softmax entry in it can reach
filter_eps (every tile that float64 NumPy finds needed is kept) or it holds a live row's target.

The Mosaic forward's 2-bit row codes are written inside a GPU kernel only; here they come from a NumPy encoder
written from the contract in `mosaic_forward` (CODE_LEVELS, the packed layout), and `from_codes` decodes them.
The low-memory op runs end to end in the interpreter (the Triton forward's tile values, the swept backward) against
float64 NumPy gradients with the tiles below filter_eps dropped.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import cce_jax
from cce_jax import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy import keep_masks
from cce_jax.ops.linear_cross_entropy import mosaic_forward
from cce_jax.ops.linear_cross_entropy import pallas_spec
from cce_jax.ops.linear_cross_entropy import triton_forward
from tests.ops.linear_cross_entropy import helpers

EPS = 2.0 ** -12
BF16 = ml_dtypes.bfloat16


def _spec(bn, bv, eps=EPS):
  cfg = PallasGpuConfig(block_n=bn, block_v=bv, block_d=16, grad_block_d=16, grad_block_n=bn, num_splits=2,
                        dense_backward_above=1.0, low_memory=False)
  return pallas_spec.make(None, 1.0, False, False, cfg, False, eps, True)


def _ceil_bf16(x):
  """The smallest bf16 >= x (float32 in, bf16 out; NumPy)."""
  y = x.astype(BF16)
  below = y.astype(np.float32) < x
  return np.where(below, np.nextafter(y, np.full_like(y, np.inf)), y)


def _tile_any(mask_NxV, bn, bv):
  """[N tiles, V tiles]: whether any entry of each (bn, bv) tile is set (edge tiles partial)."""
  n, v = mask_NxV.shape
  padded = np.pad(mask_NxV, ((0, -n % bn), (0, -v % bv)))
  return padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bv, bv).any(axis=(1, 3))


def _needed(p_NxV, targets, live, bn, bv, eps=EPS):
  """The tiles a correct keep mask must hold: a live row's entry >= eps, or a live row's target."""
  need = (p_NxV >= eps) & live[:, None]
  rows = np.flatnonzero(live & (targets >= 0) & (targets < p_NxV.shape[1]))
  need[rows, targets[rows]] = True
  return _tile_any(need, bn, bv)


def _random_logits(rng, n, v, peaks):
  """[N, V] float64 logits, N(0, 1) with one entry per row `peaks` [N] higher (at V = 3000, 3: flat, all tiles
  needed; 11 to 14: a tile's largest entry near 2^-12; 16: few entries reach it); the top entries' indices, the
  LSE and the softmax."""
  s = rng.normal(size=(n, v))
  top = rng.integers(0, v, n)
  s[np.arange(n), top] += peaks
  lse = s.max(1) + np.log(np.exp(s - s.max(1, keepdims=True)).sum(1))
  return s, top, lse, np.exp(s - lse[:, None])


def test_round_up_bf16_never_rounds_down():
  """float32 values of either sign from 2^-118 up: the bf16 result is >= x and within 2^-6 |x| of it; ±inf and
  NaN pass through. (Below 2^-119 the added |x| 2^-7 is subnormal, which XLA flushes to zero: the result is then
  x rounded to nearest, by less than 2^-126 below it.)"""
  rng = np.random.default_rng(0)
  x = (rng.uniform(1.0, 2.0, 20000) * 2.0 ** rng.integers(-118, 127, 20000)).astype(np.float32)
  x = np.concatenate([x * rng.choice([-1.0, 1.0], x.shape).astype(np.float32),
                      _ceil_bf16(x[:100]).astype(np.float32), np.float32([0.0, -0.0, 1.0, -1.0])])
  out = np.asarray(keep_masks.round_up_bf16(jnp.asarray(x)))
  assert out.dtype == BF16
  up = out.astype(np.float64)
  assert (up >= x).all(), x[up < x][:5]
  assert (up - x <= 2.0 ** -6 * np.abs(x)).all()
  special = np.asarray(keep_masks.round_up_bf16(jnp.float32([np.inf, -np.inf, np.nan]))).astype(np.float32)
  np.testing.assert_array_equal(special, [np.inf, -np.inf, np.nan])


def _numpy_forced(keep, targets, lse, inv_r, bn, bv):
  """`with_forced_tiles` from its definition: keep | every tile of a token tile with a NaN row | live targets."""
  keep = keep.copy()
  n_tiles, v_tiles = keep.shape
  for i in range(n_tiles):
    rows = slice(i * bn, (i + 1) * bn)
    if np.isnan(lse[rows]).any() or np.isnan(inv_r[rows]).any():
      keep[i] = True
  for r in np.flatnonzero(inv_r != 0):  # NaN counts as live
    keep[r // bn, min(max(targets[r] // bv, 0), v_tiles - 1)] = True
  return keep.astype(np.int32)


@pytest.mark.parametrize("eps", [EPS, 1.0])
def test_from_row_maxima_matches_numpy(eps):
  """Random bf16 row maxima, LSEs, dead rows (no cotangent), NaN rows and out-of-range targets: the mask equals
  its NumPy derivation (rmax - lse >= log eps in fp32, then the forced tiles). With eps = 1 a third of the rows
  put a tile exactly on the threshold (rmax = lse), which must be kept."""
  rng = np.random.default_rng(1)
  n, v, bn, bv = 75, 700, 16, 64
  v_tiles, stored = 11, 16  # the forward pads the row maxima to whole groups of 8 tiles
  rmax = rng.normal(0.0, 4.0, (n, stored)).astype(BF16)
  lse = (rmax.astype(np.float32).max(1) + rng.uniform(0.0, 3.0, n)).astype(np.float32)
  on_edge = rng.uniform(size=n) < 0.3
  if eps == 1.0:
    lse = np.where(on_edge, rmax[:, :v_tiles].astype(np.float32).max(1), lse)
  inv_r = np.where(rng.uniform(size=n) < 0.15, 0.0, rng.uniform(0.5, 2.0, n)).astype(np.float32)
  lse[7], inv_r[40] = np.nan, np.nan
  targets = rng.integers(0, v, n).astype(np.int32)
  targets[[3, 50]] = [-100, v + 5]
  got = np.asarray(keep_masks.from_row_maxima(_spec(bn, bv, eps), jnp.asarray(rmax), jnp.asarray(targets),
                                              jnp.asarray(lse), jnp.asarray(inv_r), v))
  gap = rmax[:, :v_tiles].astype(np.float32) - lse[:, None]
  live = (inv_r != 0)[:, None]
  want = _numpy_forced(_tile_any((gap >= np.float32(math.log(eps))) & live, bn, 1), targets, lse, inv_r, bn, bv)
  assert got.dtype == np.int32 and got.shape == (5, v_tiles)
  np.testing.assert_array_equal(got, want)
  if eps == 1.0:  # the tiles on the threshold decide some of the mask
    strict = _numpy_forced(_tile_any((gap > 0.0) & live, bn, 1), targets, lse, inv_r, bn, bv)
    assert (strict != want).any()


def test_from_row_maxima_bounds_the_needed_tiles():
  """Row maxima of float64 logits, rounded up to bf16 as the forward stores them: every needed tile is kept, and
  on these peaked rows not many more."""
  rng = np.random.default_rng(2)
  n, v, bn, bv = 90, 4000, 16, 32
  flat = (np.arange(n) >= 32) & (np.arange(n) < 48)  # one token tile of flat rows
  s, top, lse, p = _random_logits(rng, n, v, np.where(flat, 3.0, rng.uniform(13.0, 18.0, n)))
  targets = np.where(rng.uniform(size=n) < 0.8, top, rng.integers(0, v, n)).astype(np.int32)
  live = rng.uniform(size=n) > 0.1
  tile_max = np.pad(s, ((0, 0), (0, -v % bv)), constant_values=-np.inf).reshape(n, -1, bv).max(2)
  rmax = _ceil_bf16(tile_max.astype(np.float32))
  keep = np.asarray(keep_masks.from_row_maxima(_spec(bn, bv), jnp.asarray(rmax), jnp.asarray(targets),
                                               jnp.asarray(lse, jnp.float32), jnp.asarray(live, jnp.float32), v))
  need = _needed(p, targets, live, bn, bv)
  assert (keep >= need).all()
  assert need.mean() < 0.5 and keep.mean() < need.mean() + 0.05


def test_with_forced_tiles_matches_numpy():
  """Each live row's target tile (targets on both sides of tile edges, out of range ones clipped to the first or
  last tile) and every tile of a token tile with a NaN LSE or row scale join a sparse mask; dead rows add none."""
  rng = np.random.default_rng(3)
  n, v, bn, bv = 70, 2000, 16, 32
  keep = rng.uniform(size=(5, 63)) < 0.05
  lse = rng.normal(size=n).astype(np.float32)
  inv_r = np.where(rng.uniform(size=n) < 0.7, 0.0, rng.uniform(0.5, 2.0, n)).astype(np.float32)
  targets = rng.integers(0, v, n).astype(np.int32)
  edges = [2, 3, 18, 19, 35, 50, 51, 67]  # one or two per token tile
  targets[edges] = [31, -100, 32, 63, 95, 96, 10 * v, v - 1]
  inv_r[edges] = 1.0
  lse[20], inv_r[40] = np.nan, np.nan
  got = keep_masks.with_forced_tiles(_spec(bn, bv), jnp.asarray(keep), jnp.asarray(targets), jnp.asarray(lse),
                                     jnp.asarray(inv_r), v)
  np.testing.assert_array_equal(np.asarray(got), _numpy_forced(keep, targets, lse, inv_r, bn, bv))


@pytest.mark.parametrize("new_block", [8, 16, 32])
def test_from_tile_values_bounds_the_needed_tiles(new_block):
  """The low-memory rule on the Triton forward's tile values (the largest s - ref - log eps per tile) against
  float64 NumPy: equal to its definition, a superset of the needed tiles (the reference may lie above or below the
  LSE; rows with reference +inf have no live target), and still one after `regrid_rows` to other token tiles."""
  rng = np.random.default_rng(4)
  n, v, bn, bv = 75, 3000, 16, 32
  s, _, lse, p = _random_logits(rng, n, v, rng.uniform(11.0, 14.0, n))
  live = rng.uniform(size=n) > 0.15
  reference = np.where(live, lse - rng.uniform(-0.3, 0.6, n), np.inf)
  rel = np.pad(s - (reference + math.log(EPS))[:, None], ((0, -n % bn), (0, -v % bv)), constant_values=-np.inf)
  tval = rel.reshape(-1, bn, rel.shape[1] // bv, bv).max(axis=(1, 3)).astype(np.float32)
  tval = np.pad(tval, ((0, 0), (0, 3)), constant_values=np.nan)  # stored columns past the last tile: not read
  got = np.asarray(keep_masks.from_tile_values(jnp.asarray(tval), jnp.asarray(lse, jnp.float32),
                                               jnp.asarray(reference, jnp.float32), bn, bv, v))
  gap = np.where(np.isfinite(reference), reference - lse, -np.inf)
  gap = np.pad(gap, (0, -n % bn), constant_values=-np.inf).reshape(-1, bn).max(1)
  np.testing.assert_array_equal(got, tval[:, :-3] + gap[:, None] >= -keep_masks.LOW_MEMORY_SLACK)
  # The target tiles are forced later (`with_forced_tiles`, on the backward's grid): here only the softmax.
  need = _tile_any((p >= EPS) & live[:, None], bn, bv)
  assert (got >= need).all() and 0.2 < need.mean() < 0.6
  regridded = np.asarray(keep_masks.regrid_rows(jnp.asarray(got), bn, new_block, n))
  assert (regridded >= _tile_any((p >= EPS) & live[:, None], new_block, bv)).all()


@pytest.mark.parametrize("bn,bv", [(16, 128), (32, 256), (128, 512)])
def test_from_codes_bounds_the_needed_tiles(bn, bv):
  """Random row maxima d (nats past the reference and log eps) coded by the NumPy encoder: every (token tile,
  vocabulary tile) holding a live row with d >= lse - ref is kept, no tile of rows with reference +inf is, and
  a tile none of whose rows' code allows d >= lse - ref is not (the levels' upper bounds: CODE_LEVELS[code],
  +inf for the top code). 5 tiles per consumer: a partly filled byte; the last split partly empty."""
  rng = np.random.default_rng(5)
  n, v, splits, per_consumer = 260, 3000, 3, 5  # 24 tiles of 128, 30 slots
  levels = mosaic_forward.CODE_LEVELS
  k_tiles = -(-v // 128)
  # about two row maxima per (bn, bv) tile near the levels, the rest far below them
  near = rng.uniform(size=(k_tiles, n)) < 2.0 / (bn * bv // 128)
  d = np.where(near, rng.uniform(-0.6, 1.2, (k_tiles, n)), -1.0)
  lse_minus_ref = rng.uniform(-0.2, 0.7, n)
  reference = np.where(rng.uniform(size=n) < 0.1, np.inf, rng.normal(size=n))
  d[:, np.isinf(reference)] = 5.0  # would be kept if the rows counted
  lse = reference + lse_minus_ref
  keep = np.asarray(keep_masks.from_codes((helpers.numpy_pack_codes(d, splits, per_consumer, levels), per_consumer),
                                          jnp.asarray(lse, jnp.float32), jnp.asarray(reference, jnp.float32),
                                          bn, bv, v))
  live = np.isfinite(reference)
  as_tiles = lambda m_KxN: _tile_any(np.repeat(m_KxN.T, 128, axis=1)[:, :v], bn, bv)
  need = as_tiles((d >= lse_minus_ref) & live)
  code = (d[..., None] >= np.asarray(levels)).sum(-1)
  decoded = lambda bounds: as_tiles((np.asarray(bounds)[code] + keep_masks.LOW_MEMORY_SLACK >= lse_minus_ref)
                                    & live)
  allowed = decoded(tuple(levels) + (np.inf,))
  assert keep.shape == need.shape and 0.1 < need.mean() < 0.9
  assert (keep >= need).all()
  np.testing.assert_array_equal(keep, allowed)
  assert (decoded((-np.inf,) + tuple(levels)) != allowed).any()  # each code's lower bound would differ


def test_triton_forward_tile_values_and_row_maxima_match_numpy():
  """The Triton forward (interpreted) writes, per token tile and vocabulary tile, the largest s - ref (low memory)
  and, per row and tile, the largest s rounded up to bf16 (default): against float64 NumPy."""
  e, c, targets, bias = helpers.make_inputs(70, (75,), 40, 700, bias=True, regime="peaked", ignore_frac=0.1)
  n, v, bn, bv, softcap = 75, 700, 16, 32, 5.0
  cfg = PallasGpuConfig(block_n=bn, block_v=bv, block_d=16, num_splits=3, low_memory=True)
  spec = pallas_spec.make(softcap, 1.0, False, False, cfg, False, EPS, True)
  z = np.asarray(e, np.float64) @ np.asarray(c, np.float64).T + np.asarray(bias, np.float64)
  s = softcap * np.tanh(z / softcap)
  reference = np.where(np.asarray(targets) >= 0, np.random.default_rng(6).normal(3.0, 1.0, n), np.inf)
  _, tval = triton_forward.partials(spec, e, c, bias, targets, row_maxima=True,
                                    reference_N=jnp.asarray(reference, jnp.float32))
  rel = np.pad(s - reference[:, None], ((0, 0), (0, -v % bv)), constant_values=-np.inf)
  rel = rel.reshape(n, -1, bv).max(2)  # [N, V tiles]
  tval = np.asarray(tval)[:, :rel.shape[1]]
  own = np.pad(rel, ((0, -n % bn), (0, 0)), constant_values=-np.inf).reshape(-1, bn, rel.shape[1]).max(1)
  # The last token tile is moved back to end at row N (its program also sees the rows before): at least the
  # maximum over its own rows, at most that over the moved-back tile's.
  moved = np.stack([rel[min(i * bn, n - bn):min(i * bn, n - bn) + bn].max(0) for i in range(len(own))])
  assert (tval >= own - 1e-5).all() and (tval <= moved + 1e-5).all()
  assert np.isfinite(own).all()

  _, rmax = triton_forward.partials(dataclasses.replace(spec, config=dataclasses.replace(cfg, low_memory=False)),
                                    e, c, bias, targets, row_maxima=True)
  tile_max = np.pad(s, ((0, 0), (0, -v % bv)), constant_values=-np.inf).reshape(n, -1, bv).max(2)
  rmax = np.asarray(rmax)[:, :tile_max.shape[1]].astype(np.float64)
  assert (rmax >= tile_max - 1e-5).all() and (rmax <= tile_max + 2.0 ** -6 * np.abs(tile_max) + 1e-5).all()


def _numpy_tile_filtered_grads(e, c, bias, targets, softcap, bn, bv, eps):
  """float64 gradients (dE, dC, dbias) of the mean cross-entropy with every (bn, bv) logit tile whose
  |softmax - onehot| stays below eps on its scored rows dropped, and how close any tile's maximum comes to eps
  (relative)."""
  _, dz, p = helpers.numpy_mean_loss_and_logit_grads(e, c, targets, bias, softcap=softcap)
  t = np.asarray(targets)
  valid = t != helpers.IGNORE
  dev = p.copy()
  dev[np.flatnonzero(valid), t[valid]] -= 1.0
  dev = np.where(valid[:, None], np.abs(dev), 0.0)
  n, v = dev.shape
  padded = np.pad(dev, ((0, -n % bn), (0, -v % bv)))
  tile_max = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bv, bv).max(axis=(1, 3))
  keep = np.repeat(np.repeat(tile_max >= eps, bn, 0), bv, 1)[:n, :v]
  dz = np.where(keep, dz, 0.0)
  margin = np.min(np.abs(tile_max[tile_max > 0] / eps - 1.0))
  e64, c64 = np.asarray(e, np.float64), np.asarray(c, np.float64)
  return (dz @ c64, dz.T @ e64, dz.sum(0)), keep.mean(), margin


@pytest.mark.parametrize("low_memory,block_n,grad_block_n", [(True, 16, 16), (True, 16, 32), (False, 32, 16)])
def test_filtered_op_matches_numpy_tile_filtered_gradients(low_memory, block_n, grad_block_n):
  """The tile-skipping backwards (low memory: the Triton forward's tile values, the swept backward in windows of
  16 tiles; default: row maxima, compact backward) give float64 NumPy's gradients with exactly the
  [grad_block_n, block_v] tiles below filter_eps dropped, at fp32 accuracy; the loss is unfiltered."""
  e, c, targets, bias = helpers.make_inputs(71, (75,), 40, 500, bias=True, regime="peaked", ignore_frac=0.1)
  e, bias = e + 3.0 * c[jnp.maximum(targets, 0)], 0.3 * bias  # more confident: most tiles fall below eps
  bv, softcap, eps = 32, 30.0, 1e-3
  cfg = PallasGpuConfig(block_n=block_n, block_v=bv, block_d=16, grad_block_d=16, grad_block_n=grad_block_n,
                        num_splits=2, dense_backward_above=1.0, low_memory=low_memory,
                        backward_buffer_bytes=16 * grad_block_n * bv * 4)
  f = lambda e, c, b: cce_jax.linear_cross_entropy(e, c, targets, bias=b, softcap=softcap, filter_eps=eps,
                                                   implementation="pallas_gpu", config=cfg, interpret=True)
  loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(e, c, bias)
  want, kept, margin = _numpy_tile_filtered_grads(e, c, bias, targets, softcap, grad_block_n, bv, eps)
  full_loss, full_dz, _ = helpers.numpy_mean_loss_and_logit_grads(e, c, targets, bias, softcap=softcap)
  assert margin > 1e-3 and kept < 0.9  # no tile near the threshold; the filter drops tiles
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5, atol=2e-7)
  assert helpers.rel_err(full_dz @ np.asarray(c, np.float64), want[0]) > 1e-3  # the filter changes dE
  # fp32 on these confident rows (p - 1 near 0 at the target) is ~7e-5 off float64 even unfiltered (xla_chunked);
  # dropping any one of the needed tiles moves dE or dC by more than 1e-2.
  for g, w in zip(grads, want):
    assert helpers.rel_err(g, w) < 5e-4
