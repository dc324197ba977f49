"""The filtered backward of the Pallas GPU loss over the kept logit tiles only: no atomics, deterministic.

Input: a keep mask over the [N tiles, V tiles] logit tiles (from the forward's tile maxima, see `pallas_gpu`).
The kept tiles are listed in column-major order (vocabulary tile, then token tile) and processed in passes of at
most `cap` tiles, each pass a run of whole vocabulary tiles; a pass runs three kernels:

- `cce_bwd_dz`, grid (cap,): program k recomputes the logits of the pass's k-th tile, forms dZ (zero where the
  whole tile is below filter_eps) and writes it, in the compute dtype, to slot k of a [cap * block_n, block_v]
  buffer (and its column sums, fp32, when there is a bias);
- `cce_bwd_de`, grid (D blocks, N tiles): program (q, i) sums dZ[k] @ c[vocabulary tile of k, D block q] over the
  pass's tiles of token tile i (a per-row list sorted in XLA) and adds the sum to an fp32 dE;
- `cce_bwd_dc`, grid (D blocks, V tiles): program (q, j), for a vocabulary tile j of the pass, sums
  dZ[k].T @ e[token tile of k, D block q] over column j's tiles and writes dC[tile j, D block q] in c's dtype
  (zeros where no tile of the column is kept). A column lies in exactly one pass, so dC is written once.

Every sum runs in a fixed order, so the result is bitwise reproducible. Memory: the dZ buffer
(`PallasGpuConfig.buffer_bytes`), an fp32 dE and the gradients; the number of passes is data-dependent
(`lax.while_loop`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import kernel_refs
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import triton_tiles
from cce_jax.ops.linear_cross_entropy.config import pow2_floor


def tile_dz(e_ref, c_ref, b_ref, row_refs, i, j, *, spec, n, v, d):
  """dZ of logit tile (i, j) as a [block_n, block_v] fp32 array: zero on rows/columns that an earlier tile
  covers, on rows without cotangent, and everywhere when the filter drops the whole tile."""
  cfg, st_spec = spec.config, spec.stats
  bn, bv = cfg.block_n, cfg.block_v
  t_ref, lse_ref, mean_ref, g_lse_ref, g_st_ref, g_sum_ref, g_mean_ref, inv_r_ref = row_refs
  n_start, n_first = base.block_start(i, bn, n)
  v_start, v_first = base.block_start(j, bv, v)
  rows_blk = pl.ds(n_start, bn)
  rows, cols = n_start + jnp.arange(bn), v_start + jnp.arange(bv)
  row_vec = lambda ref: ref[rows_blk][:, None]
  z = triton_tiles.logit_tile(e_ref, c_ref, n_start, v_start, bn=bn, bv=bv, bd=cfg.block_d, d=d,
                              precision=triton_tiles.precision(st_spec))
  if b_ref is not None:
    z = z + b_ref[pl.ds(v_start, bv)].astype(z.dtype)[None, :]
  s, dsdz = base.transform(z, st_spec)
  ds = base.tile_dlogits(s, cols, row_vec(t_ref), row_vec(lse_ref), row_vec(mean_ref),
                                row_vec(g_lse_ref), row_vec(g_st_ref), row_vec(g_sum_ref), row_vec(g_mean_ref),
                                st_spec)
  live = ((rows >= n_first)[:, None] & (cols >= v_first)[None, :])
  live = live & ((row_vec(inv_r_ref) != 0) | (row_vec(g_sum_ref) != 0))
  ds = jnp.where(live, ds, 0.0)
  if st_spec.filter_eps is not None:
    # |dS| / max(|g_lse|, |g_target|, |g_mean|) is |softmax - onehot| for the cross-entropy.
    keep = jnp.max(jnp.abs(ds) * row_vec(inv_r_ref)) >= st_spec.filter_eps
    ds = jnp.where(keep | jnp.isnan(jnp.sum(ds)), ds, 0.0)
  return ds * dsdz


def dz_kernel(*refs, spec, n, v, d, n_tiles, has_bias, v_tiles=None, dbias=True, permuted=False):
  """Program k writes the dZ of list entry pass_ref[2] + k (if below pass_ref[3]) to slot k of the buffer (and,
  with a bias and `dbias`, its column sums); an entry is j * n_tiles + i (column-major), or i * v_tiles + j
  (row-major) when v_tiles is given. `permuted`: an extra input after pass_ref, [cap] int32, gives program k
  slot perm[k] instead (the order in which the GPU meets the tiles, not where they go)."""
  (e_ref, c_ref, b_ref, *row_refs, tiles_ref, pass_ref, perm_ref, dz_ref, dbt_ref) = kernel_refs.unpack(
      refs, e=True, c=True, bias=has_bias, targets=True, lse=True, mean=True, g_lse=True, g_target=True,
      g_sum=True, g_mean=True, inv_row_scale=True, tiles=True, pass_info=True, perm=permuted, dz=True,
      dbias_tiles=has_bias and dbias)
  k = perm_ref[pl.program_id(0)] if permuted else pl.program_id(0)
  bn = spec.config.block_n
  pos = pass_ref[2] + k

  @pl.when(pos < pass_ref[3])
  def _():
    flat = tiles_ref[pos]
    if v_tiles is None:
      j = flat // n_tiles
      i = flat - j * n_tiles
    else:
      i = flat // v_tiles
      j = flat - i * v_tiles
    dz = tile_dz(e_ref, c_ref, b_ref, row_refs, i, j, spec=spec, n=n, v=v, d=d)
    dz_ref[pl.ds(k * bn, bn), :] = dz.astype(dz_ref.dtype)
    if dbt_ref is not None:
      dbt_ref[k, :] = jnp.sum(dz, axis=0)


def _de_kernel(dz_ref, c_ref, slot_j_ref, order_ref, row_ptr_ref, _, de_ref, *, n, v, d, bn, bv, bq, precision):
  q, i = pl.program_id(0), pl.program_id(1)
  lo, hi = row_ptr_ref[i], row_ptr_ref[i + 1]

  @pl.when(hi > lo)
  def _():
    d_start, d_first = base.block_start(q, bq, d)

    def body(r, acc):  # dE.T += c.T @ dZ.T: M = bq, not the token tile (see swept_backward._seg_kernel)
      k = order_ref[r]
      v_start, _ = base.block_start(slot_j_ref[k], bv, v)
      dz = dz_ref[pl.ds(k * bn, bn), :]
      c_blk = c_ref[pl.ds(v_start, bv), pl.ds(d_start, bq)].astype(dz.dtype)
      return acc + lax.dot_general(c_blk, dz, (((0,), (1,)), ((), ())), preferred_element_type=acc.dtype,
                                   precision=precision)

    acc = lax.fori_loop(lo, hi, body, jnp.zeros((bq, bn), de_ref.dtype)).T
    n_start, n_first = base.block_start(i, bn, n)
    mask = (((n_start + jnp.arange(bn)) >= n_first)[:, None]
            & ((d_start + jnp.arange(bq)) >= d_first)[None, :])
    blk = (pl.ds(n_start, bn), pl.ds(d_start, bq))
    plgpu.store(de_ref.at[blk], de_ref[blk] + acc, mask=mask)


def _dc_kernel(*refs, n, v, d, bn, bv, bq, precision, has_bias):
  # dc_in, db_in: the inputs that dc and db alias (zeros; every entry is written here)
  dz_ref, e_ref, dbt_ref, slot_i_ref, col_ptr_ref, pass_ref, _, _, dc_ref, db_ref = kernel_refs.unpack(
      refs, dz=True, e=True, dbias_tiles=has_bias, slot_i=True, col_ptr=True, pass_info=True, dc_in=True,
      db_in=has_bias, dc=True, db=has_bias)
  q, j = pl.program_id(0), pl.program_id(1)

  @pl.when((j >= pass_ref[0]) & (j < pass_ref[1]))
  def _():
    s0 = pass_ref[2]
    lo, hi = col_ptr_ref[j] - s0, col_ptr_ref[j + 1] - s0
    d_start, d_first = base.block_start(q, bq, d)
    acc_dtype = base.acc_dtype(dz_ref.dtype, e_ref.dtype)

    def body(k, acc):
      n_start, _ = base.block_start(slot_i_ref[k], bn, n)
      dz = dz_ref[pl.ds(k * bn, bn), :]
      e_blk = e_ref[pl.ds(n_start, bn), pl.ds(d_start, bq)].astype(dz.dtype)
      return acc + lax.dot_general(dz, e_blk, (((0,), (0,)), ((), ())), preferred_element_type=acc.dtype,
                                   precision=precision)

    acc = lax.fori_loop(lo, hi, body, jnp.zeros((bv, bq), acc_dtype))
    v_start, v_first = base.block_start(j, bv, v)
    col_ok = (v_start + jnp.arange(bv)) >= v_first
    mask = col_ok[:, None] & ((d_start + jnp.arange(bq)) >= d_first)[None, :]
    plgpu.store(dc_ref.at[pl.ds(v_start, bv), pl.ds(d_start, bq)], acc.astype(dc_ref.dtype), mask=mask)
    if db_ref is not None:
      @pl.when(q == 0)
      def _():
        db = lax.fori_loop(lo, hi, lambda k, s: s + dbt_ref[k, :], jnp.zeros((bv,), dbt_ref.dtype))
        plgpu.store(db_ref.at[pl.ds(v_start, bv)], db.astype(db_ref.dtype), mask=col_ok)


def capacity(config, n_tiles: int, v_tiles: int, itemsize: int) -> int:
  """Tiles per pass: as many dZ tiles as the buffer holds (`PallasGpuConfig.buffer_bytes`), at least one full
  column of tiles."""
  per_tile = config.block_n * config.block_v * itemsize
  return int(min(max(config.buffer_bytes // per_tile, n_tiles), n_tiles * v_tiles))


def backward(spec, residuals, row_cotangents, inv_r, keep):
  """(dE, dC, dbias, None) over the tiles where `keep` ([N tiles, V tiles] int32) is nonzero."""
  e_NxD, c_VxD, bias_V, targets_N, lse, mean = residuals[:6]
  g_lse, g_st, g_sum, g_mean = row_cotangents
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  cfg = spec.config
  bn, bv = cfg.block_n, cfg.block_v
  bq = min(cfg.grad_block_d, pow2_floor(d))
  n_tiles, v_tiles = keep.shape
  has_bias = bias_V is not None
  compute = jnp.result_type(e_NxD.dtype, c_VxD.dtype)
  acc = lse.dtype
  cap = capacity(cfg, n_tiles, v_tiles, jnp.dtype(compute).itemsize)
  precision = triton_tiles.precision(spec.stats)
  params = plgpu.CompilerParams(num_warps=cfg.bwd_warps, num_stages=cfg.num_stages)
  any_spec = pl.no_block_spec

  # Kept tiles in column-major order (flat index j * n_tiles + i), padded so that a pass's window never runs over.
  (tiles,) = jnp.nonzero(keep.T.reshape(-1) != 0, size=n_tiles * v_tiles + cap, fill_value=0)
  tiles = tiles.astype(jnp.int32)
  col_ptr = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(jnp.sum(keep != 0, axis=0, dtype=jnp.int32))])
  row_args = [targets_N.astype(jnp.int32), lse, mean, g_lse, g_st, g_sum, g_mean, inv_r]
  dz_shapes = [jax.ShapeDtypeStruct((cap * bn, bv), compute)]
  if has_bias:
    dz_shapes.append(jax.ShapeDtypeStruct((cap, bv), acc))
  dz_shapes = manual_axes.kernel_out(dz_shapes, e_NxD)

  def one_pass(carry):
    j0, de, dc, db = carry
    s0 = col_ptr[j0]
    # The longest run of whole columns from j0 that fits the buffer (one column always fits).
    j1 = jnp.clip(jnp.searchsorted(col_ptr, s0 + cap, side="right").astype(jnp.int32) - 1, j0 + 1, v_tiles)
    pass_info = jnp.stack([j0, j1, s0, col_ptr[j1]]).astype(jnp.int32)
    window = lax.dynamic_slice(tiles, (s0,), (cap,))
    slot_j = window // n_tiles
    slot_i = window - slot_j * n_tiles
    row_key = jnp.where(jnp.arange(cap) < pass_info[3] - s0, slot_i, n_tiles)
    order = jnp.argsort(row_key, stable=True).astype(jnp.int32)
    row_ptr = jnp.searchsorted(row_key[order], jnp.arange(n_tiles + 1), side="left").astype(jnp.int32)

    dz_args = [e_NxD, c_VxD] + ([bias_V] if has_bias else []) + row_args + [tiles, pass_info]
    dz, *dbt = pl.pallas_call(
        functools.partial(dz_kernel, spec=spec, n=n, v=v, d=d, n_tiles=n_tiles, has_bias=has_bias),
        grid=(cap,), in_specs=[any_spec] * len(dz_args), out_specs=[any_spec] * len(dz_shapes),
        out_shape=dz_shapes, compiler_params=params, interpret=spec.interpret, name="cce_bwd_dz",
    )(*dz_args)
    n_q = pl.cdiv(d, bq)
    de = pl.pallas_call(
        functools.partial(_de_kernel, n=n, v=v, d=d, bn=bn, bv=bv, bq=bq, precision=precision),
        grid=(n_q, n_tiles), in_specs=[any_spec] * 6, out_specs=any_spec,
        out_shape=manual_axes.kernel_out(jax.ShapeDtypeStruct(de.shape, de.dtype), e_NxD), input_output_aliases={5: 0},
        compiler_params=params, interpret=spec.interpret, name="cce_bwd_de",
    )(dz, c_VxD, slot_j, order, row_ptr, de)
    outs = [dc] + ([db] if has_bias else [])
    dc_args = [dz, e_NxD] + dbt + [slot_i, col_ptr, pass_info] + outs
    dc, *db = pl.pallas_call(
        functools.partial(_dc_kernel, n=n, v=v, d=d, bn=bn, bv=bv, bq=bq, precision=precision,
                          has_bias=has_bias),
        grid=(n_q, v_tiles), in_specs=[any_spec] * len(dc_args), out_specs=[any_spec] * len(outs),
        out_shape=manual_axes.kernel_out([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs], e_NxD),
        input_output_aliases={len(dc_args) - len(outs) + k: k for k in range(len(outs))},
        compiler_params=params, interpret=spec.interpret, name="cce_bwd_dc",
    )(*dc_args)
    return j1, de, dc, db[0] if has_bias else None

  init = manual_axes.vary((jnp.int32(0), jnp.zeros((n, d), acc), jnp.zeros((v, d), c_VxD.dtype),
                           jnp.zeros((v,), bias_V.dtype) if has_bias else None), manual_axes.axes(e_NxD))
  _, de, dc, db = lax.while_loop(lambda carry: carry[0] < v_tiles, one_pass, init)
  return de.astype(e_NxD.dtype), dc, db, None
