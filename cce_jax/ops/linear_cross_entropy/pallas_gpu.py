"""Pallas kernels for NVIDIA GPUs: the per-token logit statistics and their backward.

Same contract as `xla_chunked.logit_stats` (the math: `base`): one custom_vjp whose outputs are the
per-token LSE, target logit, logit sum and softmax-mean logit, from which `stats_losses` forms every loss.

This file holds the custom_vjp and the choice of kernels; the kernels live beside it.

Forward: per-split statistics from the Triton kernel of `triton_forward` (token tiles × vocabulary splits), or on
Hopper GPUs from the Mosaic GPU kernel of `mosaic_forward` (wgmma/TMA, warp specialised; same partial outputs)
where its input conditions hold (`PallasGpuConfig.forward_kernel`); the splits are merged here.

Backward. Without filtering (`filter_eps=None`) and with `exact=True` it is the dense blockwise backward: per
block of logits, dZ (on Hopper from the Mosaic GPU kernel of `mosaic_dlogits`, else from XLA), then dense
GEMMs for dE and dC; no atomics, deterministic. With filtering the backward skips the logit tiles of
`grad_block_n` tokens × `block_v` entries whose softmax entries all fall below filter_eps (a live row's target
tile is always kept), from a keep mask that the forward prepares in one of two ways.

`PallasGpuConfig.low_memory` (off by default: slow where most tiles are kept): the forward codes each row's
largest logit per tile against ref, an estimate of the row's LSE a little below it, computed ahead in XLA from a
sample of the vocabulary (`lse_estimate`): d = row max - ref - log(filter_eps), and p >= filter_eps needs
d >= lse - ref (mostly in [0, 0.5)). The Mosaic forward writes d as a 2-bit code per row and 128-wide tile
(`mosaic_forward.CODE_LEVELS`; 2 MiB per 2^23 row-tiles), the Triton forward the largest d per tile; the forward
turns either into the keep mask right away (`keep_masks`), and the backward is `swept_backward`'s: no fp32 dE, no dense
fallback, a small dZ buffer.

Otherwise the forward writes each row's largest logit in each vocabulary tile ([N, V tiles], bf16 rounded up),
which bounds every softmax entry of a tile by exp(row max - LSE of the row); the backward turns that into the
keep mask (`keep_masks.from_row_maxima`) and
- when at most `dense_backward_above` of the tiles are kept, runs `compact_backward` over the kept tiles only:
  their dZ into a buffer, then dE per token tile and dC per vocabulary tile from it (no atomics, deterministic);
- otherwise runs the dense backward, faster when most tiles are kept (on Hopper dZ of every tile from
  `mosaic_dlogits`, else the XLA backward). It computes every tile and so zeroes none: where the filter would
  keep most tiles the result is the full gradient, as accurate as `filter_eps=None`. The choice is made on the
  device (`lax.cond`).

Triton needs power-of-2 block shapes; the dimensions need not be multiples of them: a block that would run past
the end of an array is moved back to end at the edge and its already-covered rows/columns are masked, so no
input is padded or copied.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import compact_backward
from cce_jax.ops.linear_cross_entropy import keep_masks
from cce_jax.ops.linear_cross_entropy import lse_estimate
from cce_jax.ops.linear_cross_entropy import mosaic_dlogits
from cce_jax.ops.linear_cross_entropy import mosaic_forward
from cce_jax.ops.linear_cross_entropy import mosaic_pipeline
from cce_jax.ops.linear_cross_entropy import pallas_spec
from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy import swept_backward
from cce_jax.ops.linear_cross_entropy import triton_forward
from cce_jax.ops.linear_cross_entropy import xla_backward
from cce_jax.ops.linear_cross_entropy.base import LogitStats


def cross_entropy_per_token(e_NxD, c_VxD, bias_V, targets_N, valid_N, *, softcap, label_smoothing, z_loss,
                            filter_eps, exact, config, interpret=False, combine=None, vocab_size=None):
  """Per-token loss [N] (0 where not valid_N) and LSE [N], fp32, by the Pallas kernels. combine: applied to the
  statistics before the loss (a vocabulary split's merge), with the split's `vocab_size`."""
  spec = pallas_spec.make(softcap, 1.0, bool(label_smoothing), False, config, exact, filter_eps, interpret)
  if config.sort_vocabulary and pallas_spec.tile_skipping(spec):
    c_VxD, bias_V, targets_N = _sorted_vocabulary(e_NxD, c_VxD, bias_V, targets_N, valid_N)
  stats = LogitStats(*_stats(spec, e_NxD, c_VxD, bias_V, targets_N))
  stats = stats if combine is None else combine(stats)
  return stats_losses.cross_entropy(stats, valid_N, vocab_size=vocab_size or c_VxD.shape[0],
                                    label_smoothing=label_smoothing, z_loss=z_loss)


def logprobs_per_token(e_NxD, c_VxD, bias_V, targets_N, *, softcap, temperature, exact, config, interpret=False,
                       combine=None):
  """log p(target) [N] and entropy [N] of softmax(logits / temperature), fp32, by the Pallas kernels."""
  spec = pallas_spec.make(softcap, 1.0 / temperature, False, True, config, exact, None, interpret)
  stats = LogitStats(*_stats(spec, e_NxD, c_VxD, bias_V, targets_N))
  return stats_losses.logprobs(stats if combine is None else combine(stats))


def _sorted_vocabulary(e_NxD, c_VxD, bias_V, targets_N, valid_N):
  """(c, bias, targets) with the vocabulary reordered by decreasing mean logit over the scored tokens
  ((mean e) @ c.T + bias: exact without a softcap, a ranking heuristic with one), so that the entries that keep
  logit tiles alive share tiles (CCE §4.3). The loss does not change; the gradients reach c and bias through the
  gather (a scatter of unique rows). Costs a permuted copy of c."""
  v = c_VxD.shape[0]
  w_N = valid_N.astype(jnp.float32)
  mean_e = (w_N @ e_NxD.astype(jnp.float32)) / jnp.maximum(jnp.sum(w_N), 1.0)
  score = c_VxD.astype(jnp.float32) @ mean_e
  if bias_V is not None:
    score = score + bias_V.astype(jnp.float32)
  perm = jnp.argsort(-score, stable=True)
  rank = jnp.zeros((v,), jnp.int32).at[perm].set(jnp.arange(v, dtype=jnp.int32), unique_indices=True)
  targets = targets_N.astype(jnp.int32)
  in_range = (targets >= 0) & (targets < v)
  targets = jnp.where(in_range, rank[jnp.clip(targets, 0, v - 1)], targets)
  gather = lambda x: x.at[perm].get(unique_indices=True, mode="promise_in_bounds")
  return gather(c_VxD), None if bias_V is None else gather(bias_V), targets


def _mosaic_forward(spec, e_NxD, c_VxD, bias_V) -> bool:
  """Whether the forward runs the Mosaic GPU kernel (config.forward_kernel, the inputs, the GPU)."""
  row_max_block_v = spec.config.block_v if pallas_spec.tile_skipping(spec) else None
  return pallas_spec.use_mosaic(spec, "forward_kernel", "triton",
                                mosaic_forward.unsupported_reason(e_NxD, c_VxD, bias_V, row_max_block_v))


def _mosaic_dlogits(spec, e_NxD, c_VxD, bias_V) -> bool:
  """Whether the dense backward takes dZ from the Mosaic GPU kernel (config.dense_backward_kernel, the inputs,
  the GPU)."""
  return pallas_spec.use_mosaic(spec, "dense_backward_kernel", "xla",
                                mosaic_pipeline.unsupported_reason(e_NxD, c_VxD, bias_V))


def _mosaic_partials(spec, e_NxD, c_VxD, targets_N, row_maxima, reference_N=None):
  """The Mosaic GPU forward: per-(sub)split statistics [2 × splits, N] and the row maxima per block_v tile (or,
  given reference_N, the packed row codes and the tiles per consumer, for `keep_masks.from_codes`)."""
  n, v = e_NxD.shape[0], c_VxD.shape[0]
  cfg, st_spec = spec.config, spec.stats
  skipping = row_maxima and pallas_spec.tile_skipping(spec)
  splits = cfg.num_splits or mosaic_pipeline.default_splits(n, v)
  partials, rmax = mosaic_forward.forward_partials(
      e_NxD, c_VxD, targets_N, softcap=st_spec.softcap, inv_temperature=st_spec.inv_temperature,
      with_sum=st_spec.with_sum, with_mean=st_spec.with_mean, with_row_max=skipping and reference_N is None,
      splits=splits, reference_N=reference_N, filter_eps=st_spec.filter_eps,
      approx_math=cfg.approx_math, interpret=spec.interpret)
  if reference_N is not None:
    return partials, rmax  # (packed codes, tiles per consumer)
  if rmax is not None:
    group = cfg.block_v // mosaic_forward.ROW_MAX_BLOCK_V  # 128-wide maxima -> block_v-wide
    tiles = pl.cdiv(rmax.shape[1], group) * group
    rmax = jnp.pad(rmax, ((0, 0), (0, tiles - rmax.shape[1])), constant_values=-jnp.inf)
    rmax = keep_masks.round_up_bf16(jnp.max(rmax.reshape(n, tiles // group, group), axis=2))
  return partials, rmax


def _stats_fwd(spec, e_NxD, c_VxD, bias_V, targets_N, row_maxima=True):
  """Statistics and residuals; the row maxima (for the tile-skipping backward) only when row_maxima (with
  low_memory: the keep mask before the backward's forced tiles)."""
  reference = None
  if row_maxima and pallas_spec.tile_skipping(spec) and spec.config.low_memory:
    reference = lse_estimate.reference(spec.stats, e_NxD, c_VxD, bias_V, targets_N)
  mosaic = _mosaic_forward(spec, e_NxD, c_VxD, bias_V)
  if mosaic:
    partials, rmax = _mosaic_partials(spec, e_NxD, c_VxD, targets_N, row_maxima, reference)
  else:
    ref_eps = None if reference is None else reference + math.log(spec.stats.filter_eps)
    partials, rmax = triton_forward.partials(spec, e_NxD, c_VxD, bias_V, targets_N, reference_N=ref_eps,
                                             row_maxima=row_maxima and pallas_spec.tile_skipping(spec))
  m, l, st, ssum, w = partials
  # Merge the vocabulary splits.
  m_max = jnp.max(m, axis=0)
  scale = jnp.exp(m - m_max[None, :])
  l_sum = jnp.sum(l * scale, axis=0)
  lse = m_max + jnp.log(l_sum)
  mean = jnp.sum(w * scale, axis=0) / l_sum if spec.stats.with_mean else jnp.zeros_like(lse)
  out = (lse, jnp.sum(st, axis=0), jnp.sum(ssum, axis=0), mean)
  if reference is not None:
    cfg = spec.config
    if mosaic:
      rmax = keep_masks.from_codes(rmax, lse, reference, cfg.grad_block_n, cfg.block_v, c_VxD.shape[0])
    else:
      rmax = keep_masks.from_tile_values(rmax, lse, reference, cfg.block_n, cfg.block_v, c_VxD.shape[0])
      rmax = keep_masks.regrid_rows(rmax, cfg.block_n, cfg.grad_block_n, lse.shape[0])
  return out, (e_NxD, c_VxD, bias_V, targets_N, lse, mean, rmax)


def _dense_bwd(spec, residuals, cotangents):
  """The blockwise dense backward (dense GEMMs, no atomics; deterministic): exact mode, no filtering, or
  filtering that would keep most tiles. It computes every tile, so it zeroes none: the full gradient (a filter
  there would cost accuracy and save no work). On Hopper dZ comes from the Mosaic GPU kernel of
  `mosaic_dlogits`; else the XLA backward."""
  spec = dataclasses.replace(spec, stats=dataclasses.replace(spec.stats, filter_eps=None))
  e_NxD, c_VxD = residuals[0], residuals[1]
  tiles = spec.config.exact_backward_tiles(e_NxD.shape[0], c_VxD.shape[0])
  if _mosaic_dlogits(spec, e_NxD, c_VxD, residuals[2]):
    return mosaic_dlogits.dense_backward(
        spec.stats, residuals, cotangents, block_n=tiles.block_n, block_v=tiles.block_v,
        splits=spec.config.num_splits or mosaic_pipeline.default_splits(tiles.block_n, tiles.block_v),
        approx_math=spec.config.approx_math, interpret=spec.interpret)
  return xla_backward.backward(spec.stats, tiles, residuals[:6], cotangents)


def _stats_bwd(spec, residuals, cotangents):
  if not pallas_spec.tile_skipping(spec):
    return _dense_bwd(spec, residuals, cotangents)
  dense = lambda: _dense_bwd(spec, residuals, cotangents)
  spec = pallas_spec.backward_spec(spec)
  c_VxD, targets_N, lse, rmax = residuals[1], residuals[3], residuals[4], residuals[6]
  row_cotangents, inv_r = base.backward_cotangents(spec.stats, residuals, cotangents)
  if spec.config.low_memory:
    keep = keep_masks.with_forced_tiles(spec, rmax, targets_N, lse, inv_r, c_VxD.shape[0])
    return swept_backward.backward(spec, residuals, row_cotangents, inv_r, keep)
  keep = keep_masks.from_row_maxima(spec, rmax, targets_N, lse, inv_r, c_VxD.shape[0])
  sparse = lambda: compact_backward.backward(spec, residuals, row_cotangents, inv_r, keep)
  threshold = spec.config.dense_backward_above
  if threshold >= 1.0:
    return sparse()
  return lax.cond(jnp.mean(keep.astype(jnp.float32)) > threshold, dense, sparse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(spec, e_NxD, c_VxD, bias_V, targets_N):
  return _stats_fwd(spec, e_NxD, c_VxD, bias_V, targets_N, row_maxima=False)[0]  # no backward: no row maxima


_stats.defvjp(_stats_fwd, _stats_bwd)
