"""The dense backward with a Mosaic GPU (Hopper) kernel for the logit gradients.

Per block of [block_n tokens, block_v vocabulary entries] (as in the XLA dense backward), one kernel recomputes
the logits tile by tile with the pipeline of `mosaic_pipeline` and writes dZ = dL/dz in bf16 straight from its
epilogue (the XLA backward writes the fp32 logits, reads them back, writes dZ); then two XLA GEMMs
accumulate dE += dZ @ c_blk (fp32) and dC_blk = dZ.T @ e_blk (fp32 over the token blocks). No atomics, a fixed
order: bitwise deterministic. No tile is skipped and nothing is zeroed: used for exact mode, filter_eps=None, and
as the filtered mode's fallback when most tiles are kept (where it gives the full gradient).
Input conditions: `mosaic_pipeline.unsupported_reason`.

dS = (g_lse + g_mean (1 + s - mean)) softmax(s) + g_target onehot(t) + g_sum, dZ = dS · ds/dz (see
`base.tile_dlogits`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import mosaic_pipeline as mp

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_ROWS = 8  # per-token inputs of the kernel: lse, g_lse, g_target, g_sum, g_mean, mean, live, inverse row scale


def dlogits(e_NxD, c_VxD, targets_N, rows_RxN, *, softcap, inv_temperature, with_sum, with_mean, splits,
            approx_math=True, interpret=False):
  """dZ [N, V] bf16 of one block: e_NxD [N, D] bf16 (N % 8 == 0), c_VxD [V, D] bf16, targets [N] int32,
  rows_RxN [8, N] fp32 (lse, g_lse, g_target, g_sum, g_mean, mean, live 0/1, an unused row that keeps the
  TMA box [8, N])."""
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  c_VxD = mp.pad_vocabulary(c_VxD)  # the kernel masks columns >= v
  v_out = pl.cdiv(v, mp.BV) * mp.BV  # whole [128, 128] tiles per TMA store
  out_bytes = 2 * mp.BN * mp.BV * 2
  stages = mp.num_stages(mp.block_d(d), out_bytes + 2 * _ROWS * mp.BN * 4 + 1024)
  v_per_split, splits = mp.split_vocabulary(v, splits)
  kernel = functools.partial(_kernel, d=d, v=v, stages=stages, v_per_split=v_per_split, softcap=softcap,
                             inv_temperature=inv_temperature, with_sum=with_sum, with_mean=with_mean)
  dz = mp.launch(kernel, jax.ShapeDtypeStruct((n, v_out), e_NxD.dtype), n=n, splits=splits,
                 approx_math=approx_math, interpret=interpret)(e_NxD, c_VxD, targets_N.astype(jnp.int32), rows_RxN)
  return dz if v_out == v else dz[:, :v]


def _kernel(e_ref, c_ref, t_ref, rows_ref, dz_ref, *, d, v, stages, v_per_split, softcap, inv_temperature,
            with_sum, with_mean):
  n0, v_lo, num_tiles = mp.cta_range(v, v_per_split)
  swizzle = plgpu.find_swizzle(mp.BV * 16)
  out_transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))

  def consumer(wg, for_each_tile, t_smem, rows_smem, out_smem, bar):
    plgpu.copy_gmem_to_smem(t_ref.at[pl.ds(n0, mp.BN)], t_smem.at[wg], bar.at[wg])
    plgpu.copy_gmem_to_smem(rows_ref.at[:, pl.ds(n0, mp.BN)], rows_smem.at[wg], bar.at[wg])
    plgpu.barrier_wait(bar.at[wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    tgt = plgpu.load(t_smem.at[wg], layout=row_layout)
    lse, g_lse, g_st, g_sum, g_mean, mean, live, _ = (
        plgpu.load(rows_smem.at[wg, k], layout=row_layout) for k in range(_ROWS))
    shape = (mp.BN, mp.BV)
    bcast = lambda r: lax.broadcast_in_dim(r, shape, [0])
    lse2 = lse * _LOG2E

    def body(t, v_start, z, carry):
      if softcap is not None:
        th = jnp.tanh(z * (1.0 / softcap))
        s2 = th * (softcap * inv_temperature * _LOG2E)  # the logit in log2 units
        dsdz = 1.0 - th * th
        if inv_temperature != 1.0:
          dsdz = dsdz * inv_temperature
      else:
        s2 = z * (inv_temperature * _LOG2E)
        dsdz = None if inv_temperature == 1.0 else inv_temperature
      p = jnp.exp2(s2 - bcast(lse2))
      coef = bcast(g_lse)
      if with_mean:
        coef = coef + bcast(g_mean) * (1.0 + s2 * _LN2 - bcast(mean))
      cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + v_start
      ds = coef * p + jnp.where(cols == bcast(tgt), bcast(g_st), 0.0)
      if with_sum:
        ds = ds + bcast(g_sum)
      # Rows without a cotangent give exact zeros, also where their logits are NaN (an ignored token's garbage
      # hidden state). Columns >= v are not masked: they only exist in the output's padding, which is sliced off.
      ds = jnp.where(bcast(live) > 0.0, ds, 0.0)
      dz = ds if dsdz is None else ds * dsdz
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
      out_smem.at[wg][...] = dz.astype(out_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem.at[wg], dz_ref.at[pl.ds(n0, mp.BN), pl.ds(v_start, mp.BV)])
      return carry

    for_each_tile(body, 0)
    plgpu.wait_smem_to_gmem(0)

  mp.logit_tiles(
      e_ref, c_ref, n0=n0, v_lo=v_lo, num_tiles=num_tiles, d=d, stages=stages, consumer=consumer,
      scratch_types=(plgpu.SMEM((2, mp.BN), jnp.int32), plgpu.SMEM((2, _ROWS, mp.BN), jnp.float32),
                     plgpu.SMEM((2, mp.BN, mp.BV), e_ref.dtype, transforms=out_transforms),
                     plgpu.Barrier(num_arrivals=2, num_barriers=2)))


def dense_backward(stats_spec, residuals, cotangents, *, block_n, block_v, splits, approx_math, interpret):
  """(dE, dC, None, None) of the statistics from their residuals and cotangents, blockwise: dZ by `dlogits`,
  dE and dC by XLA GEMMs with fp32 accumulation. Vocabulary blocks of block_v entries (the last one smaller)."""
  e_NxD, c_VxD, _, targets_N, lse, mean = residuals[:6]
  (g_lse, g_st, g_sum, g_mean), inv_row_scale = base.backward_cotangents(stats_spec, residuals, cotangents)
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  live = ((inv_row_scale != 0) | (g_sum != 0)).astype(jnp.float32)
  rows = jnp.stack([lse, g_lse, g_st, g_sum, g_mean, mean, live, inv_row_scale]).astype(jnp.float32)
  e_NxD, targets = mp.pad_tokens(e_NxD, targets_N.astype(jnp.int32))
  n8 = e_NxD.shape[0]
  rows = jnp.pad(rows, ((0, 0), (0, n8 - n)))  # live = 0 on the padding
  block_n = min(-(-block_n // 8) * 8, n8)
  acc = jnp.float32
  kw = dict(softcap=stats_spec.softcap, inv_temperature=stats_spec.inv_temperature,
            with_sum=stats_spec.with_sum, with_mean=stats_spec.with_mean, splits=splits, approx_math=approx_math,
            interpret=interpret)

  n_blocks = pl.cdiv(n8, block_n)
  # One token block: the GEMM's own fp32 accumulator is the whole dC sum, rounded once to c's dtype (as a GEMM to
  # fp32 then a cast, which XLA would hand to a slower Triton fusion: H200 gemma2_2b 15.3 vs 16.2 ms).
  dc_dtype = c_VxD.dtype if n_blocks == 1 else acc

  def vocab_block(carry, v_start, c_blk):
    """Adds this block's columns' share of dE and writes its dC, over the token blocks (fp32 accumulation)."""
    bv = c_blk.shape[0]

    def n_step(carry, i):
      de_acc, dc_blk = carry
      n_start, n_first = base.block_start(i, block_n, n8)
      e_blk = lax.dynamic_slice(e_NxD, (n_start, 0), (block_n, d))
      r_blk = lax.dynamic_slice(rows, (0, n_start), (_ROWS, block_n))
      r_blk = r_blk.at[6].multiply((n_start + jnp.arange(block_n) >= n_first).astype(jnp.float32))
      t_blk = lax.dynamic_slice(targets, (n_start,), (block_n,)) - v_start  # the kernel's columns are the block's
      dz = dlogits(e_blk, c_blk, t_blk, r_blk, **kw)
      de = lax.dynamic_slice(de_acc, (n_start, 0), (block_n, d)) + jnp.dot(dz, c_blk, preferred_element_type=acc)
      dc_t = lax.dot_general(dz, e_blk, (((0,), (0,)), ((), ())), preferred_element_type=dc_dtype)
      dc_blk = dc_t if n_blocks == 1 else dc_blk + dc_t
      return (lax.dynamic_update_slice(de_acc, de, (n_start, 0)), dc_blk), None

    de_acc, dc = carry
    dc_init = manual_axes.vary(jnp.zeros((bv, d), dc_dtype), manual_axes.axes(e_NxD))
    (de_acc, dc_blk), _ = lax.scan(n_step, (de_acc, dc_init), jnp.arange(n_blocks))
    return de_acc, lax.dynamic_update_slice(dc, dc_blk.astype(dc.dtype), (v_start, 0))

  def v_step(carry, j):
    return vocab_block(carry, j * block_v, lax.dynamic_slice(c_VxD, (j * block_v, 0), (block_v, d))), None

  full_blocks = v // block_v
  carry = manual_axes.vary((jnp.zeros((n8, d), acc), jnp.zeros_like(c_VxD)), manual_axes.axes(e_NxD))
  carry, _ = lax.scan(v_step, carry, jnp.arange(full_blocks))
  if v % block_v:  # the remaining columns: one smaller block (a static shape)
    carry = vocab_block(carry, full_blocks * block_v, c_VxD[full_blocks * block_v:])
  de_acc, dc = carry
  return de_acc[:n].astype(e_NxD.dtype), dc, None, None
