"""The keep masks of the tile-skipping backwards: which [grad_block_n, block_v] logit tiles may hold a softmax
entry >= filter_eps, from what the forward wrote (`pallas_gpu`).

- `from_row_maxima`: each row's largest logit per vocabulary tile (bf16, rounded up: `round_up_bf16`) bounds every
  softmax entry of the tile by exp(row max - LSE of the row);
- low memory (`PallasGpuConfig.low_memory`): the forward codes each row's largest logit per tile against an
  estimate of the row's LSE (`lse_estimate`): `from_codes` reads the Mosaic forward's 2-bit codes,
  `from_tile_values` the Triton forward's largest value per tile (on its own token tiles, then `regrid_rows`).

`with_forced_tiles` then keeps every tile of a row with a NaN and each live row's target tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cce_jax.ops.linear_cross_entropy import mosaic_forward


def round_up_bf16(x):
  """x in bf16, never below x: x + |x| 2^-7 rounded to nearest (bf16's rounding error is at most |x| 2^-8)."""
  return jnp.where(jnp.isfinite(x), x + jnp.abs(x) * 2.0 ** -7, x).astype(jnp.bfloat16)


# The tile values and the XLA references differ by the kernels' approximate tanh / exp2 and fp32 summation order
# (~1e-5 nats): the keep test takes this much slack.
LOW_MEMORY_SLACK = 1e-3


def from_row_maxima(spec, rmax, targets_N, lse, inv_r, v):
  """[N tiles, V tiles] int32: 0 where no softmax entry of the tile reaches filter_eps and no live row's target
  falls in it (the kernel then skips the tile outright), else 1.

  rmax [N, >= V tiles] (bf16, rounded up) holds each row's largest transformed logit in each vocabulary tile, so
  p = exp(s - lse_r) <= exp(rmax - lse_r): the kernel's own test up to that rounding. NaN anywhere in a row tile
  keeps its tiles, so NaN reaches the gradients."""
  bn, bv = spec.config.block_n, spec.config.block_v
  n = lse.shape[0]
  n_tiles, v_tiles = pl.cdiv(n, bn), pl.cdiv(v, bv)
  live = inv_r != 0
  gap = jnp.where(live[:, None], rmax[:, :v_tiles].astype(lse.dtype) - lse[:, None], -jnp.inf)
  gap = jnp.pad(gap, ((0, n_tiles * bn - n), (0, 0)), constant_values=-jnp.inf)
  keep = jnp.max(gap.reshape(n_tiles, bn, v_tiles), axis=1) >= jnp.log(spec.stats.filter_eps)
  return with_forced_tiles(spec, keep, targets_N, lse, inv_r, v)


def with_forced_tiles(spec, keep, targets_N, lse, inv_r, v):
  """keep [N tiles, V tiles] bool | the tiles of rows with a NaN (all of them) | live rows' target tiles, int32."""
  bn, bv = spec.config.block_n, spec.config.block_v
  n = lse.shape[0]
  n_tiles, v_tiles = keep.shape
  tile_of_row = jnp.arange(n) // bn
  bad = jax.ops.segment_max((jnp.isnan(lse) | jnp.isnan(inv_r)).astype(jnp.int32), tile_of_row,
                            num_segments=n_tiles)
  keep = keep | (bad[:, None] != 0)
  target_tile = jnp.clip(targets_N.astype(jnp.int32) // bv, 0, v_tiles - 1)
  has_target = jnp.zeros((n_tiles, v_tiles), jnp.bool_).at[tile_of_row, target_tile].max(inv_r != 0)
  return (keep | has_target).astype(jnp.int32)


def from_codes(codes, lse, reference, bn, bv, v):
  """The low-memory keep mask [N tiles, V tiles] bool from the Mosaic forward's row codes: row r needs tile k
  when CODE_UPPER[code] (+ slack) >= lse_r - ref_r, never where ref_r is +inf (no live target). Reduced over each
  token tile's rows in the codes' own layout first (so the per-row decode fuses into that reduction), then put in
  vocabulary order."""
  packed, per_consumer = codes
  splits, _, groups, n = packed.shape
  n_tiles = pl.cdiv(n, bn)
  code = mosaic_forward.decode_codes(packed)  # [splits, 2, groups, 4, N]
  upper = jnp.select([code == k for k in (0, 1, 2)], [mosaic_forward.CODE_UPPER[k] for k in (0, 1, 2)], jnp.inf)
  need = jnp.isfinite(reference) & (upper + LOW_MEMORY_SLACK >= lse - reference)
  need = jnp.pad(need, ((0, 0),) * 4 + ((0, n_tiles * bn - n),))
  need = jnp.any(need.reshape(splits, 2, groups * 4, n_tiles, bn), axis=-1)[:, :, :per_consumer]
  need = need.transpose(3, 0, 2, 1).reshape(n_tiles, -1)  # 128-tile 2 (split T + t) + consumer
  g = bv // mosaic_forward.ROW_MAX_BLOCK_V
  v_tiles = pl.cdiv(v, bv)
  need = jnp.pad(need, ((0, 0), (0, max(0, v_tiles * g - need.shape[1]))))[:, :v_tiles * g]
  return jnp.any(need.reshape(n_tiles, v_tiles, g), axis=2)


def from_tile_values(tval, lse, reference, bn, bv, v):
  """The low-memory keep mask [N tiles, V tiles] bool from the Triton forward's tile values (the largest
  s - ref per tile): s - lse_r <= value + max over the tile's rows of (ref - lse)."""
  n = lse.shape[0]
  n_tiles, v_tiles = pl.cdiv(n, bn), pl.cdiv(v, bv)
  gap = jnp.where(jnp.isfinite(reference), reference - lse, -jnp.inf)
  gap = jax.ops.segment_max(gap, jnp.arange(n) // bn, num_segments=n_tiles)
  return tval[:, :v_tiles] + gap[:, None] >= -LOW_MEMORY_SLACK


def regrid_rows(keep, block, new_block, n):
  """A keep mask over token tiles of `block` rows as one over tiles of `new_block` rows (powers of 2): a new tile
  is kept where any old tile that shares a row with it is."""
  if new_block <= block:
    return keep[(jnp.arange(pl.cdiv(n, new_block)) * new_block) // block]
  group = new_block // block
  tiles = pl.cdiv(n, new_block)
  keep = jnp.pad(keep, ((0, tiles * group - keep.shape[0]), (0, 0)))
  return jnp.any(keep.reshape(tiles, group, keep.shape[1]), axis=1)
