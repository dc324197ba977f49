"""The Triton forward of "pallas_gpu" (`cce_fwd`): per-split statistics, and what the tile-skipping backward reads.

Grid (token tiles, vocabulary splits). A program owns `block_n` tokens and one contiguous split of the vocabulary,
walks it `block_v` columns at a time, builds each [block_n, block_v] logit tile by a loop over D in `block_d`
chunks (fp32 accumulation; `triton_tiles`) and keeps an online log-sum-exp; the splits are merged in XLA
(`pallas_gpu`). Splitting the vocabulary keeps the GPU full when N / block_n is small. With row maxima it also
writes each row's largest logit per vocabulary tile, or (low memory) the largest logit less a per-row reference
per tile, for the keep masks of `keep_masks`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import keep_masks
from cce_jax.ops.linear_cross_entropy import kernel_refs
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import triton_tiles

# Row maxima of this many consecutive vocabulary tiles are gathered in registers and stored together as one
# [block_n, 8] block. (On an H200 the softcapped gemma2_2b forward at 8 warps paid ~3.5 ms of 21 for the row
# maxima whether stored per tile or per group; at 4 warps, the default when filtering, it runs in 22.8 ms.)
ROW_MAX_GROUP = 8


def partials(spec, e_NxD, c_VxD, bias_V, targets_N, *, row_maxima, reference_N=None):
  """The Triton forward: the per-split statistics (m, l, target, sum, weighted; each [splits, N] fp32) and, with
  row_maxima, each row's largest logit per block_v tile [N, V tiles] (bf16, rounded up), or given reference_N
  ([N] fp32, with row_maxima) the largest s - reference_N per tile [N tiles, V tiles] fp32 instead; else None."""
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  cfg = spec.config
  splits = cfg.num_splits_for(n, v)
  v_per_split = pl.cdiv(pl.cdiv(v, splits), cfg.block_v) * cfg.block_v
  splits = pl.cdiv(v, v_per_split)
  part = jax.ShapeDtypeStruct((splits, n), base.acc_dtype(e_NxD.dtype, c_VxD.dtype))
  args = [e_NxD, c_VxD] + ([bias_V] if bias_V is not None else []) + [targets_N.astype(jnp.int32)]
  out_shape = [part] * 5
  with_reference = reference_N is not None
  if with_reference and not row_maxima:
    raise ValueError("triton_forward.partials: reference_N comes with row_maxima")
  if with_reference:
    args.append(reference_N)
  if row_maxima:
    v_tiles = pl.cdiv(pl.cdiv(v, cfg.block_v), ROW_MAX_GROUP) * ROW_MAX_GROUP
    if with_reference:  # the largest s - (reference + log filter_eps) per tile
      out_shape.append(jax.ShapeDtypeStruct((pl.cdiv(n, cfg.block_n), v_tiles), part.dtype))
    else:
      out_shape.append(jax.ShapeDtypeStruct((n, v_tiles), jnp.bfloat16))
  out_shape = manual_axes.kernel_out(out_shape, e_NxD)
  outs = pl.pallas_call(
      functools.partial(_kernel, spec=spec, n=n, v=v, d=d, v_per_split=v_per_split, has_bias=bias_V is not None,
                        with_row_max=row_maxima and not with_reference, with_reference=with_reference),
      grid=(pl.cdiv(n, cfg.block_n), splits),
      in_specs=[pl.no_block_spec] * len(args),
      out_specs=[pl.no_block_spec] * len(out_shape),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=spec.interpret,
      name="cce_fwd",
  )(*args)
  return outs[:5], (outs[5] if len(outs) > 5 else None)


def _kernel(*refs, spec, n, v, d, v_per_split, has_bias, with_row_max, with_reference):
  cfg, st_spec = spec.config, spec.stats
  bn, bv, bd = cfg.block_n, cfg.block_v, cfg.block_d
  # rmax: the largest logit per row and tile [N, V tiles]; tmax: max(s - reference) per tile [N tiles, V tiles].
  e_ref, c_ref, b_ref, t_ref, ref_ref, m_ref, l_ref, st_ref, sum_ref, w_ref, rmax_ref, tmax_ref = kernel_refs.unpack(
      refs, e=True, c=True, bias=has_bias, targets=True, reference=with_reference, m=True, l=True, target=True,
      sum=True, weighted=True, row_max=with_row_max, tile_max=with_reference)

  i, j = pl.program_id(0), pl.program_id(1)
  n_start = jnp.minimum(i * bn, n - bn)
  targets = t_ref[pl.ds(n_start, bn)]
  reference = ref_ref[pl.ds(n_start, bn)] if with_reference else None
  v_lo = j * v_per_split
  v_hi = jnp.minimum(v, v_lo + v_per_split)
  group = ROW_MAX_GROUP

  precision = triton_tiles.precision(st_spec)

  def keep_row_max(v_first, row_max, buf):
    """Puts the tile's row maxima (rounded up; with low_memory their maximum) in its slot of the group buffer;
    stores the group when full or at the split's last tile, masked to this split's tiles."""
    tile = v_first // bv
    slot = tile % group
    if tmax_ref is not None:
      buf = jnp.where(jnp.arange(group) == slot, jnp.max(row_max - reference), buf)
    else:
      buf = jnp.where(jnp.arange(group)[None, :] == slot, keep_masks.round_up_bf16(row_max)[:, None], buf)

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
