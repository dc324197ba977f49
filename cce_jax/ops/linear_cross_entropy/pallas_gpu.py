"""Pallas kernels for NVIDIA GPUs: the per-token logit statistics and their backward.

Same contract as `xla_chunked.logit_stats` (the math: `base`): one custom_vjp whose outputs are the
per-token LSE, target logit, logit sum and softmax-mean logit, from which `stats_losses` forms every loss.

Forward (`cce_fwd`): grid (token tiles, vocabulary splits). A program owns `block_n` tokens and one contiguous
split of the vocabulary, walks it `block_v` columns at a time, builds each [block_n, block_v] logit tile by a loop
over D in `block_d` chunks (fp32 accumulation) and keeps an online log-sum-exp; the splits are merged in XLA.
Splitting the vocabulary keeps the GPU full when N / block_n is small. On Hopper GPUs the forward runs the
Mosaic GPU kernel of `mosaic_forward` instead (wgmma/TMA, warp specialised; same partial outputs) where its
input conditions hold (`PallasGpuConfig.forward_kernel`).

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
turns either into the keep mask right away, and the backward is `swept_backward`'s: no fp32 dE, no dense
fallback, a small dZ buffer.

Otherwise the forward writes each row's largest logit in each vocabulary tile ([N, V tiles], bf16 rounded up),
which bounds every softmax entry of a tile by exp(row max - LSE of the row); the backward turns that into the
keep mask and
- when at most `dense_backward_above` of the tiles are kept, runs `compact_backward` over the kept tiles only:
  their dZ into a buffer, then dE per token tile and dC per vocabulary tile from it (no atomics, deterministic);
- otherwise runs the dense backward, faster when most tiles are kept (on Hopper dZ of every tile from
  `mosaic_dlogits`, each row of a tile zeroed where it is below filter_eps; else the XLA backward with the
  filter per dense block). The choice is made on the device (`lax.cond`).

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
from jax.experimental.pallas import triton as plgpu

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import compact_backward
from cce_jax.ops.linear_cross_entropy import lse_estimate
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import mosaic_dlogits
from cce_jax.ops.linear_cross_entropy import mosaic_forward
from cce_jax.ops.linear_cross_entropy import mosaic_pipeline
from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy import swept_backward
from cce_jax.ops.linear_cross_entropy import triton_tiles
from cce_jax.ops.linear_cross_entropy import xla_backward
from cce_jax.ops.linear_cross_entropy.base import LogitStats
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig


def cross_entropy_per_token(e_ND, c_VD, bias_V, targets_N, valid_N, *, softcap, label_smoothing, z_loss,
                            filter_eps, exact, config, interpret=False, combine=None, vocab_size=None):
  """Per-token loss [N] (0 where not valid_N) and LSE [N], fp32, by the Pallas kernels. combine: applied to the
  statistics before the loss (a vocabulary split's merge), with the split's `vocab_size`."""
  spec = _spec(softcap, 1.0, bool(label_smoothing), False, config, exact, filter_eps, interpret)
  if config.sort_vocabulary and _tile_skipping(spec):
    c_VD, bias_V, targets_N = _sorted_vocabulary(e_ND, c_VD, bias_V, targets_N, valid_N)
  stats = LogitStats(*_stats(spec, e_ND, c_VD, bias_V, targets_N))
  stats = stats if combine is None else combine(stats)
  return stats_losses.cross_entropy(stats, valid_N, vocab_size=vocab_size or c_VD.shape[0],
                                    label_smoothing=label_smoothing, z_loss=z_loss)


def _sorted_vocabulary(e_ND, c_VD, bias_V, targets_N, valid_N):
  """(c, bias, targets) with the vocabulary reordered by decreasing mean logit over the scored tokens
  ((mean e) @ c.T + bias: exact without a softcap, a ranking heuristic with one), so that the entries that keep
  logit tiles alive share tiles (CCE §4.3). The loss does not change; the gradients reach c and bias through the
  gather (a scatter of unique rows). Costs a permuted copy of c."""
  v = c_VD.shape[0]
  w_N = valid_N.astype(jnp.float32)
  mean_e = (w_N @ e_ND.astype(jnp.float32)) / jnp.maximum(jnp.sum(w_N), 1.0)
  score = c_VD.astype(jnp.float32) @ mean_e
  if bias_V is not None:
    score = score + bias_V.astype(jnp.float32)
  perm = jnp.argsort(-score, stable=True)
  rank = jnp.zeros((v,), jnp.int32).at[perm].set(jnp.arange(v, dtype=jnp.int32), unique_indices=True)
  targets = targets_N.astype(jnp.int32)
  in_range = (targets >= 0) & (targets < v)
  targets = jnp.where(in_range, rank[jnp.clip(targets, 0, v - 1)], targets)
  gather = lambda x: x.at[perm].get(unique_indices=True, mode="promise_in_bounds")
  return gather(c_VD), None if bias_V is None else gather(bias_V), targets


def logprobs_per_token(e_ND, c_VD, bias_V, targets_N, *, softcap, temperature, exact, config, interpret=False,
                       combine=None):
  """log p(target) [N] and entropy [N] of softmax(logits / temperature), fp32, by the Pallas kernels."""
  spec = _spec(softcap, 1.0 / temperature, False, True, config, exact, None, interpret)
  stats = LogitStats(*_stats(spec, e_ND, c_VD, bias_V, targets_N))
  return stats_losses.logprobs(stats if combine is None else combine(stats))


@dataclasses.dataclass(frozen=True)
class _Spec:
  stats: base.StatsSpec  # the math options
  config: PallasGpuConfig
  interpret: bool


def _spec(softcap, inv_temperature, with_sum, with_mean, config, exact, filter_eps, interpret):
  stats = base.StatsSpec(softcap=softcap, inv_temperature=inv_temperature, with_sum=with_sum,
                         with_mean=with_mean, exact=exact, filter_eps=filter_eps)
  return _Spec(stats=stats, config=config, interpret=interpret)


# Row maxima of this many consecutive vocabulary tiles are gathered in registers and stored together as one
# [block_n, 8] block. (On an H200 the softcapped gemma2_2b forward at 8 warps paid ~3.5 ms of 21 for the row
# maxima whether stored per tile or per group; at 4 warps, the default when filtering, it runs in 22.8 ms.)
_ROW_MAX_GROUP = 8


def _fwd_kernel(*refs, spec, n, v, d, v_per_split, has_bias, with_reference):
  cfg, st_spec = spec.config, spec.stats
  bn, bv, bd = cfg.block_n, cfg.block_v, cfg.block_d
  refs = list(refs)
  e_ref, c_ref = refs.pop(0), refs.pop(0)
  b_ref = refs.pop(0) if has_bias else None
  t_ref = refs.pop(0)
  ref_ref = refs.pop(0) if with_reference else None
  m_ref, l_ref, st_ref, sum_ref, w_ref = refs[:5]
  rmax_ref = refs[5] if len(refs) > 5 and not with_reference else None  # per row and tile, or
  tmax_ref = refs[5] if with_reference else None  # max(s - reference) per tile: [N tiles, V tiles]

  i, j = pl.program_id(0), pl.program_id(1)
  n_start = jnp.minimum(i * bn, n - bn)
  targets = t_ref[pl.ds(n_start, bn)]
  reference = ref_ref[pl.ds(n_start, bn)] if with_reference else None
  v_lo = j * v_per_split
  v_hi = jnp.minimum(v, v_lo + v_per_split)
  group = _ROW_MAX_GROUP

  precision = triton_tiles.precision(st_spec)

  def keep_row_max(v_first, row_max, buf):
    """Puts the tile's row maxima (rounded up; with low_memory their maximum) in its slot of the group buffer;
    stores the group when full or at the split's last tile, masked to this split's tiles."""
    tile = v_first // bv
    slot = tile % group
    if tmax_ref is not None:
      buf = jnp.where(jnp.arange(group) == slot, jnp.max(row_max - reference), buf)
    else:
      buf = jnp.where(jnp.arange(group)[None, :] == slot, _round_up_bf16(row_max)[:, None], buf)

    @pl.when((slot == group - 1) | (tile == (v_hi - 1) // bv))
    def _():
      first = tile - slot
      cols = first + jnp.arange(group)
      ok = (cols >= v_lo // bv) & (cols <= tile)
      if tmax_ref is not None:
        plgpu.store(tmax_ref.at[i, pl.ds(first, group)], buf, mask=ok)
      else:
        plgpu.store(rmax_ref.at[pl.ds(n_start, bn), pl.ds(first, group)], buf, mask=ok[None, :])

    return buf

  def tile_stats(v_first, z, carry):
    """Folds one finished [bn, bv] logit tile (columns from v_first, moved back at the edge) into the stats."""
    m, l, st, ssum, w, buf = carry
    v_start = jnp.minimum(v_first, v - bv)
    cols = v_start + jnp.arange(bv)
    col_ok = ((cols >= v_first) & (cols < v_hi))[None, :]
    if b_ref is not None:
      z = z + b_ref[pl.ds(v_start, bv)].astype(z.dtype)[None, :]
    s, _ = base.transform(z, st_spec)
    s_ok = jnp.where(col_ok, s, 0.0)
    row_max = jnp.max(jnp.where(col_ok, s, -jnp.inf), axis=1)
    if rmax_ref is not None or tmax_ref is not None:  # the tile's largest logits, for the backward's skip mask
      buf = keep_row_max(v_first, row_max, buf)
    m_new = jnp.maximum(m, row_max)
    rescale = jnp.exp(m - m_new)
    p = jnp.where(col_ok, jnp.exp(s - m_new[:, None]), 0.0)
    l = l * rescale + jnp.sum(p, axis=1)
    st = st + jnp.sum(jnp.where(cols[None, :] == targets[:, None], s_ok, 0.0), axis=1)
    if st_spec.with_sum:
      ssum = ssum + jnp.sum(s_ok, axis=1)
    if st_spec.with_mean:
      w = w * rescale + jnp.sum(p * s_ok, axis=1)
    return m_new, l, st, ssum, w, buf

  zeros = jnp.zeros((bn,), m_ref.dtype)
  buf = jnp.zeros((group,), m_ref.dtype) if tmax_ref is not None else jnp.zeros((bn, group), jnp.bfloat16)
  init = (zeros - jnp.inf, zeros, zeros, zeros, zeros, buf)
  num_tiles = (jnp.maximum(v_hi - v_lo, 0) + bv - 1) // bv
  if cfg.flat_loop:
    # One loop over (vocabulary tile, D chunk) pairs: the operand pipeline runs across tile boundaries and the
    # statistics update runs under a branch on the last D chunk.
    nd = pl.cdiv(d, bd)
    compute = jnp.result_type(e_ref.dtype, c_ref.dtype)
    acc = base.acc_dtype(compute)

    def flat_body(k, carry):
      stats, z = carry
      t = k // nd
      kd = k - t * nd
      v_first = v_lo + t * bv
      z = z + triton_tiles.logit_chunk(e_ref, c_ref, n_start, jnp.minimum(v_first, v - bv), kd, bn=bn, bv=bv,
                                       bd=bd, d=d, precision=precision)
      return lax.cond(kd == nd - 1, lambda a: (tile_stats(v_first, a[1], a[0]), jnp.zeros_like(a[1])),
                      lambda a: a, (stats, z))

    m, l, st, ssum, w, _ = lax.fori_loop(0, num_tiles * nd, flat_body, (init, jnp.zeros((bn, bv), acc)))[0]
  else:
    def body(k, carry):
      v_first = v_lo + k * bv
      z = triton_tiles.logit_tile(e_ref, c_ref, n_start, jnp.minimum(v_first, v - bv), bn=bn, bv=bv, bd=bd, d=d,
                                  precision=precision)
      return tile_stats(v_first, z, carry)

    m, l, st, ssum, w, _ = lax.fori_loop(0, num_tiles, body, init)
  rows = pl.ds(n_start, bn)
  m_ref[j, rows] = m
  l_ref[j, rows] = l
  st_ref[j, rows] = st
  sum_ref[j, rows] = ssum
  w_ref[j, rows] = w


def _use_mosaic(spec, field, fallback, reason) -> bool:
  """Whether a Mosaic GPU kernel runs, for config.<field> in ("auto", "mosaic", fallback) and the reason it
  cannot run these inputs (None if it can): "auto" on Hopper GPUs when it can; "mosaic" always, else an error."""
  kind = getattr(spec.config, field)
  if kind == fallback:
    return False
  if reason is None and not spec.interpret and not mosaic_pipeline.is_hopper():
    reason = f"needs a Hopper (sm_90) GPU, got {jax.devices()[0].device_kind}"
  if kind == "auto":
    return reason is None and not spec.interpret
  if reason is not None:
    raise ValueError(f"PallasGpuConfig({field}='mosaic'): the Mosaic GPU kernel {reason}; {field}='auto' falls "
                     f"back to the {fallback} kernel")
  return True


def _mosaic_forward(spec, e_ND, c_VD, bias_V) -> bool:
  """Whether the forward runs the Mosaic GPU kernel (config.forward_kernel, the inputs, the GPU)."""
  row_max_block_v = spec.config.block_v if _tile_skipping(spec) else None
  return _use_mosaic(spec, "forward_kernel", "triton",
                     mosaic_forward.unsupported_reason(e_ND, c_VD, bias_V, row_max_block_v))


def _mosaic_dlogits(spec, e_ND, c_VD, bias_V) -> bool:
  """Whether the dense backward takes dZ from the Mosaic GPU kernel (config.dense_backward_kernel, the inputs,
  the GPU). With gradient filtering the dense backward is the fallback for when most tiles are kept; the Mosaic
  kernel filters there per row of each tile (the XLA one per [block_n, block_v] block of the dense backward)."""
  return _use_mosaic(spec, "dense_backward_kernel", "xla", mosaic_pipeline.unsupported_reason(e_ND, c_VD, bias_V))


def _mosaic_partials(spec, e_ND, c_VD, targets_N, row_maxima, reference_N=None):
  """The Mosaic GPU forward: per-(sub)split statistics [2 × splits, N] and the row maxima per block_v tile (or,
  given reference_N, the packed row codes and the tiles per consumer, for `_keep_from_codes`)."""
  n, v = e_ND.shape[0], c_VD.shape[0]
  cfg, st_spec = spec.config, spec.stats
  skipping = row_maxima and _tile_skipping(spec)
  splits = cfg.num_splits or mosaic_pipeline.default_splits(n, v)
  partials, rmax = mosaic_forward.forward_partials(
      e_ND, c_VD, targets_N, softcap=st_spec.softcap, inv_temperature=st_spec.inv_temperature,
      with_sum=st_spec.with_sum, with_mean=st_spec.with_mean, with_row_max=skipping and reference_N is None,
      splits=splits, reference_N=reference_N, filter_eps=st_spec.filter_eps,
      approx_math=cfg.approx_math, interpret=spec.interpret)
  if reference_N is not None:
    return partials, rmax  # (packed codes, tiles per consumer)
  if rmax is not None:
    group = cfg.block_v // mosaic_forward.ROW_MAX_BLOCK_V  # 128-wide maxima -> block_v-wide
    tiles = pl.cdiv(rmax.shape[1], group) * group
    rmax = jnp.pad(rmax, ((0, 0), (0, tiles - rmax.shape[1])), constant_values=-jnp.inf)
    rmax = _round_up_bf16(jnp.max(rmax.reshape(n, tiles // group, group), axis=2))
  return partials, rmax


def _keep_from_codes(codes, lse, reference, bn, bv, v):
  """The low-memory keep mask [N tiles, V tiles] bool from the Mosaic forward's row codes: row r needs tile k
  when CODE_UPPER[code] (+ slack) >= lse_r - ref_r, never where ref_r is +inf (no live target). Reduced over each
  token tile's rows in the codes' own layout first (so the per-row decode fuses into that reduction), then put in
  vocabulary order."""
  packed, per_consumer = codes
  splits, _, groups, n = packed.shape
  n_tiles = pl.cdiv(n, bn)
  code = mosaic_forward.decode_codes(packed)  # [splits, 2, groups, 4, N]
  upper = jnp.select([code == k for k in (0, 1, 2)], [mosaic_forward.CODE_UPPER[k] for k in (0, 1, 2)], jnp.inf)
  need = jnp.isfinite(reference) & (upper + _LOW_MEMORY_SLACK >= lse - reference)
  need = jnp.pad(need, ((0, 0),) * 4 + ((0, n_tiles * bn - n),))
  need = jnp.any(need.reshape(splits, 2, groups * 4, n_tiles, bn), axis=-1)[:, :, :per_consumer]
  need = need.transpose(3, 0, 2, 1).reshape(n_tiles, -1)  # 128-tile 2 (split T + t) + consumer
  g = bv // mosaic_forward.ROW_MAX_BLOCK_V
  v_tiles = pl.cdiv(v, bv)
  need = jnp.pad(need, ((0, 0), (0, max(0, v_tiles * g - need.shape[1]))))[:, :v_tiles * g]
  return jnp.any(need.reshape(n_tiles, v_tiles, g), axis=2)


def _regrid_rows(keep, block, new_block, n):
  """A keep mask over token tiles of `block` rows as one over tiles of `new_block` rows (powers of 2): a new tile
  is kept where any old tile that shares a row with it is."""
  if new_block <= block:
    return keep[(jnp.arange(pl.cdiv(n, new_block)) * new_block) // block]
  group = new_block // block
  tiles = pl.cdiv(n, new_block)
  keep = jnp.pad(keep, ((0, tiles * group - keep.shape[0]), (0, 0)))
  return jnp.any(keep.reshape(tiles, group, keep.shape[1]), axis=1)


def _backward_spec(spec):
  """The spec whose block_n is the tile-skipping backward's token tile (`PallasGpuConfig.grad_block_n`)."""
  return dataclasses.replace(spec, config=dataclasses.replace(spec.config, block_n=spec.config.grad_block_n))


def _keep_from_tile_values(tval, lse, reference, bn, bv, v):
  """The low-memory keep mask [N tiles, V tiles] bool from the Triton forward's tile values (the largest
  s - ref per tile): s - lse_r <= value + max over the tile's rows of (ref - lse)."""
  n = lse.shape[0]
  n_tiles, v_tiles = pl.cdiv(n, bn), pl.cdiv(v, bv)
  gap = jnp.where(jnp.isfinite(reference), reference - lse, -jnp.inf)
  gap = jax.ops.segment_max(gap, jnp.arange(n) // bn, num_segments=n_tiles)
  return tval[:, :v_tiles] + gap[:, None] >= -_LOW_MEMORY_SLACK


def _triton_partials(spec, e_ND, c_VD, bias_V, targets_N, row_maxima, reference_N=None):
  """The Triton forward: per-split statistics [splits, N] and the row maxima (or, given reference_N, the tile
  values; or None)."""
  n, d = e_ND.shape
  v = c_VD.shape[0]
  cfg = spec.config
  splits = cfg.num_splits_for(n, v)
  v_per_split = pl.cdiv(pl.cdiv(v, splits), cfg.block_v) * cfg.block_v
  splits = pl.cdiv(v, v_per_split)
  part = jax.ShapeDtypeStruct((splits, n), base.acc_dtype(e_ND.dtype, c_VD.dtype))
  args = [e_ND, c_VD] + ([bias_V] if bias_V is not None else []) + [targets_N.astype(jnp.int32)]
  out_shape = [part] * 5
  with_reference = reference_N is not None  # given only with row_maxima and tile skipping
  if with_reference:
    args.append(reference_N)
  if row_maxima and _tile_skipping(spec):
    v_tiles = pl.cdiv(pl.cdiv(v, cfg.block_v), _ROW_MAX_GROUP) * _ROW_MAX_GROUP
    if with_reference:  # the largest s - (reference + log filter_eps) per tile
      out_shape.append(jax.ShapeDtypeStruct((pl.cdiv(n, cfg.block_n), v_tiles), part.dtype))
    else:
      out_shape.append(jax.ShapeDtypeStruct((n, v_tiles), jnp.bfloat16))
  out_shape = manual_axes.kernel_out(out_shape, e_ND)
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec, n=n, v=v, d=d, v_per_split=v_per_split,
                        has_bias=bias_V is not None, with_reference=with_reference),
      grid=(pl.cdiv(n, cfg.block_n), splits),
      in_specs=[pl.no_block_spec] * len(args),
      out_specs=[pl.no_block_spec] * len(out_shape),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=spec.interpret,
      name="cce_fwd",
  )(*args)
  return outs[:5], (outs[5] if len(outs) > 5 else None)


def _stats_fwd(spec, e_ND, c_VD, bias_V, targets_N, row_maxima=True):
  """Statistics and residuals; the row maxima (for the tile-skipping backward) only when row_maxima (with
  low_memory: the keep mask before the backward's forced tiles)."""
  reference = None
  if row_maxima and _tile_skipping(spec) and spec.config.low_memory:
    reference = lse_estimate.reference(spec.stats, e_ND, c_VD, bias_V, targets_N)
  mosaic = _mosaic_forward(spec, e_ND, c_VD, bias_V)
  if mosaic:
    partials, rmax = _mosaic_partials(spec, e_ND, c_VD, targets_N, row_maxima, reference)
  else:
    ref_eps = None if reference is None else reference + math.log(spec.stats.filter_eps)
    partials, rmax = _triton_partials(spec, e_ND, c_VD, bias_V, targets_N, row_maxima, ref_eps)
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
      rmax = _keep_from_codes(rmax, lse, reference, cfg.grad_block_n, cfg.block_v, c_VD.shape[0])
    else:
      rmax = _keep_from_tile_values(rmax, lse, reference, cfg.block_n, cfg.block_v, c_VD.shape[0])
      rmax = _regrid_rows(rmax, cfg.block_n, cfg.grad_block_n, lse.shape[0])
  return out, (e_ND, c_VD, bias_V, targets_N, lse, mean, rmax)


def _dense_bwd(spec, residuals, cotangents):
  """The blockwise dense backward (dense GEMMs, no atomics; deterministic): exact mode, no filtering, or
  filtering that would keep most tiles. On Hopper dZ comes from the Mosaic GPU kernel of `mosaic_dlogits`;
  else the XLA backward."""
  e_ND, c_VD = residuals[0], residuals[1]
  tiles = spec.config.exact_backward_tiles(e_ND.shape[0], c_VD.shape[0])
  if _mosaic_dlogits(spec, e_ND, c_VD, residuals[2]):
    return mosaic_dlogits.dense_backward(
        spec.stats, residuals, cotangents, block_n=tiles.block_n, block_v=tiles.block_v,
        splits=spec.config.num_splits or mosaic_pipeline.default_splits(tiles.block_n, tiles.block_v),
        approx_math=spec.config.approx_math, interpret=spec.interpret)
  return xla_backward.backward(spec.stats, tiles, residuals[:6], cotangents)


def _round_up_bf16(x):
  """x in bf16, never below x: x + |x| 2^-7 rounded to nearest (bf16's rounding error is at most |x| 2^-8)."""
  return jnp.where(jnp.isfinite(x), x + jnp.abs(x) * 2.0 ** -7, x).astype(jnp.bfloat16)


# The tile values and the XLA references differ by the kernels' approximate tanh / exp2 and fp32 summation order
# (~1e-5 nats): the keep test takes this much slack.
_LOW_MEMORY_SLACK = 1e-3


def _tile_keep_mask_low_memory(spec, keep, targets_N, lse, inv_r, v):
  """The forward's low-memory keep mask (bool) with the forced tiles of `_tile_keep_mask`."""
  return _with_forced_tiles(spec, keep, targets_N, lse, inv_r, v)


def _with_forced_tiles(spec, keep, targets_N, lse, inv_r, v):
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


def _tile_keep_mask(spec, rmax, targets_N, lse, inv_r, v):
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
  return _with_forced_tiles(spec, keep, targets_N, lse, inv_r, v)


def _tile_skipping(spec) -> bool:
  """Whether the backward may run the tile-skipping kernels (and so the forward writes per-row tile maxima)."""
  return (spec.stats.filter_eps is not None and not spec.stats.exact
          and spec.config.dense_backward_above > 0.0)


def _stats_bwd(spec, residuals, cotangents):
  if not _tile_skipping(spec):
    return _dense_bwd(spec, residuals, cotangents)
  dense = lambda: _dense_bwd(spec, residuals, cotangents)
  spec = _backward_spec(spec)
  c_VD, targets_N, lse, rmax = residuals[1], residuals[3], residuals[4], residuals[6]
  row_cotangents, inv_r = base.backward_cotangents(spec.stats, residuals, cotangents)
  if spec.config.low_memory:
    keep = _tile_keep_mask_low_memory(spec, rmax, targets_N, lse, inv_r, c_VD.shape[0])
    return swept_backward.backward(spec, residuals, row_cotangents, inv_r, keep)
  keep = _tile_keep_mask(spec, rmax, targets_N, lse, inv_r, c_VD.shape[0])
  sparse = lambda: compact_backward.backward(spec, residuals, row_cotangents, inv_r, keep)
  threshold = spec.config.dense_backward_above
  if threshold >= 1.0:
    return sparse()
  return lax.cond(jnp.mean(keep.astype(jnp.float32)) > threshold, dense, sparse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(spec, e_ND, c_VD, bias_V, targets_N):
  return _stats_fwd(spec, e_ND, c_VD, bias_V, targets_N, row_maxima=False)[0]  # no backward: no row maxima


_stats.defvjp(_stats_fwd, _stats_bwd)
