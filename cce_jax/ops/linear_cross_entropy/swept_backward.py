"""The low-memory filtered backward of the Pallas GPU loss (`PallasGpuConfig.low_memory`): two sweeps over the
kept logit tiles, each gradient written once in its own dtype, no [N, D] or [V, D] fp32 accumulator.

Input: a keep mask over the [N tiles, V tiles] logit tiles. The kept tiles are listed twice: column-major
(vocabulary tile, then token tile) for dC and row-major for dE. Each sweep walks its list in windows of `cap`
tiles (as many dZ tiles as `backward_buffer_bytes` holds); per window two kernels run:

- `cce_bwd_dz` (the tile kernel of `compact_backward`), grid (cap,): the window's dZ tiles into the buffer;
- `cce_bwd_seg`, grid (D blocks, cap): program (q, u) sums the window's u-th run of tiles that share an output
  tile (a vocabulary tile for dC: dZ.T @ e; a token tile for dE: dZ @ c) in fp32 and writes the output tile in
  the gradient's dtype, or, when the run continues into the next window, hands the fp32 partial sum to it (a
  [block, D] fp32 carry).

Every sum runs in a fixed order: the result is bitwise reproducible. It equals the tile-skipping backward of
`compact_backward` up to fp32 summation order. Each kept tile's dZ is computed twice (once per sweep); the
windows' runs bound the parallelism of a window (a token tile's run spans all its kept tiles). Memory: the dZ
buffer, two tile lists of N tiles × V tiles int32, the windows' run tables, two carries and the gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import compact_backward
from cce_jax.ops.linear_cross_entropy import kernel_refs
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import triton_tiles
from cce_jax.ops.linear_cross_entropy.config import pow2_floor

# Window information, int32: the fields that the tile kernel reads (start, length) sit where it reads them.
_FIRST_CONTINUES, _LAST_CONTINUES, _START, _LENGTH, _RUNS = range(5)


def _seg_kernel(*refs, for_dc, n, v, d, bn, bv, bq, n_tiles, v_tiles, precision, has_bias):
  # x: e for dC, c for dE; out_in, db_in: the inputs that out and db alias (written here where a run ends).
  (dz_ref, x_ref, dbt_ref, tiles_ref, run_lo_ref, info_ref, carry_in_ref, cb_in_ref, _, _, out_ref, db_ref, carry_ref,
   cb_ref) = kernel_refs.unpack(
       refs, dz=True, x=True, dbias_tiles=has_bias, tiles=True, run_lo=True, info=True, carry_in=True,
       bias_carry_in=has_bias, out_in=True, db_in=has_bias, out=True, db=has_bias, carry=True, bias_carry=has_bias)
  q, u = pl.program_id(0), pl.program_id(1)
  s0, runs = info_ref[_START], info_ref[_RUNS]

  def decode(flat):  # (owner tile, other tile) of a list entry
    if for_dc:
      j = flat // n_tiles
      return j, flat - j * n_tiles
    i = flat // v_tiles
    return i, flat - i * v_tiles

  @pl.when(u < runs)
  def _():
    lo, hi = run_lo_ref[u], run_lo_ref[u + 1]
    owner, _ = decode(tiles_ref[s0 + lo])
    d_start, d_first = base.block_start(q, bq, d)
    acc_dtype = base.acc_dtype(dz_ref.dtype, x_ref.dtype)

    def body(k, acc):
      _, other = decode(tiles_ref[s0 + k])
      dz = dz_ref[pl.ds(k * bn, bn), :]
      if for_dc:
        x_start, _ = base.block_start(other, bn, n)
        x = x_ref[pl.ds(x_start, bn), pl.ds(d_start, bq)].astype(dz.dtype)
        dims = (((0,), (0,)), ((), ()))
      else:
        x_start, _ = base.block_start(other, bv, v)
        x = x_ref[pl.ds(x_start, bv), pl.ds(d_start, bq)].astype(dz.dtype)
        # dE.T += c.T @ dZ.T: a [bq, bn] product, M = bq (a 32-token dZ.T would give M = 32, too short for
        # Hopper's wgmma; H200 llama3_8b_4k random dE sweep 19.1 -> 17.4 ms)
        dims = (((0,), (1,)), ((), ()))
        return acc + lax.dot_general(x, dz, dims, preferred_element_type=acc.dtype, precision=precision)
      return acc + lax.dot_general(dz, x, dims, preferred_element_type=acc.dtype, precision=precision)

    if for_dc:
      acc = lax.fori_loop(lo, hi, body, jnp.zeros((bv, bq), acc_dtype))
    else:
      acc = lax.fori_loop(lo, hi, body, jnp.zeros((bq, bn), acc_dtype)).T
    rows = bv if for_dc else bn
    carried_in = (u == 0) & (info_ref[_FIRST_CONTINUES] != 0)
    acc = acc + jnp.where(carried_in, carry_in_ref[:, pl.ds(d_start, bq)], 0.0)
    carried_out = (u == runs - 1) & (info_ref[_LAST_CONTINUES] != 0)
    o_start, o_first = base.block_start(owner, rows, v if for_dc else n)
    row_ok = (o_start + jnp.arange(rows)) >= o_first
    mask = row_ok[:, None] & ((d_start + jnp.arange(bq)) >= d_first)[None, :]

    @pl.when(carried_out)
    def _():
      carry_ref[:, pl.ds(d_start, bq)] = acc

    @pl.when(~carried_out)
    def _():
      plgpu.store(out_ref.at[pl.ds(o_start, rows), pl.ds(d_start, bq)], acc.astype(out_ref.dtype), mask=mask)

    if has_bias:
      @pl.when(q == 0)
      def _():
        db = lax.fori_loop(lo, hi, lambda k, s: s + dbt_ref[k, :], jnp.zeros((bv,), dbt_ref.dtype))
        db = db + jnp.where(carried_in, cb_in_ref[...], 0.0)

        @pl.when(carried_out)
        def _():
          cb_ref[...] = db

        @pl.when(~carried_out)
        def _():
          plgpu.store(db_ref.at[pl.ds(o_start, bv)], db.astype(db_ref.dtype), mask=row_ok)


def _sweep(spec, for_dc, residuals, row_args, keep, out, db, cap):
  """One sweep: dC (and dbias) over the column-major list when for_dc, else dE over the row-major one."""
  e_NxD, c_VxD, bias_V = residuals[:3]
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  cfg = spec.config
  bn, bv = cfg.block_n, cfg.block_v
  # grad_block_d for both sweeps. (At 128-token tiles a dE window held few runs, and D blocks of 32 made more
  # programs; at 32-token tiles 128 is faster: H200 dE sweep gemma2_2b / llama3_8b_4k peaked 3.20 / 2.53 ms at
  # 128 vs 3.89 / 3.18 at 32.)
  bq = min(cfg.grad_block_d, pow2_floor(d))
  n_tiles, v_tiles = keep.shape
  has_bias = for_dc and bias_V is not None
  compute = jnp.result_type(e_NxD.dtype, c_VxD.dtype)
  acc = row_args[1].dtype
  precision = triton_tiles.precision(spec.stats)
  params = plgpu.CompilerParams(num_warps=cfg.bwd_warps, num_stages=cfg.num_stages)
  any_spec = pl.no_block_spec

  order = keep.T if for_dc else keep
  windows = pl.cdiv(n_tiles * v_tiles, cap)  # at most
  (tiles,) = jnp.nonzero(order.reshape(-1) != 0, size=(windows + 1) * cap, fill_value=0)
  tiles = tiles.astype(jnp.int32)
  length = jnp.sum(keep != 0, dtype=jnp.int32)
  per_owner = n_tiles if for_dc else v_tiles
  run_lo, info = _windows(tiles // per_owner, length, cap, windows)
  dz_shapes = [jax.ShapeDtypeStruct((cap * bn, bv), compute)]
  if has_bias:
    dz_shapes.append(jax.ShapeDtypeStruct((cap, bv), acc))
  dz_shapes = manual_axes.kernel_out(dz_shapes, e_NxD)
  carry_rows = bv if for_dc else bn

  def window(carry):
    w, out, db, carry_in, cb_in = carry
    info_w = lax.dynamic_index_in_dim(info, w, keepdims=False)
    run_lo_w = lax.dynamic_index_in_dim(run_lo, w, keepdims=False)
    dz_args = [e_NxD, c_VxD] + ([bias_V] if bias_V is not None else []) + row_args + [tiles, info_w]
    if not for_dc:  # the dE list is row-major; its dZ programs run by vocabulary tile, so that the window's token
      # tiles that keep a vocabulary tile read its c rows together (H200 llama3_8b_4k random dE sweep 20.5 -> 19.0 ms)
      slots = w * cap + jnp.arange(cap, dtype=jnp.int32)
      vocab_tile = jnp.where(slots < length, lax.dynamic_slice_in_dim(tiles, w * cap, cap) % v_tiles, v_tiles)
      dz_args.append(jnp.argsort(vocab_tile, stable=True).astype(jnp.int32))
    dz, *dbt = pl.pallas_call(
        functools.partial(compact_backward.dz_kernel, spec=spec, n=n, v=v, d=d, n_tiles=n_tiles,
                          v_tiles=None if for_dc else v_tiles, has_bias=bias_V is not None, dbias=has_bias,
                          permuted=not for_dc),
        grid=(cap,), in_specs=[any_spec] * len(dz_args), out_specs=[any_spec] * len(dz_shapes),
        out_shape=dz_shapes, compiler_params=params, interpret=spec.interpret, name="cce_bwd_dz",
    )(*dz_args)
    outs = [out] + ([db] if has_bias else [])
    args = ([dz, e_NxD if for_dc else c_VxD] + dbt + [tiles, run_lo_w, info_w, carry_in]
            + ([cb_in] if has_bias else []) + outs)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs] + [jax.ShapeDtypeStruct(carry_in.shape, acc)]
    if has_bias:
      out_shape.append(jax.ShapeDtypeStruct((bv,), acc))
    out_shape = manual_axes.kernel_out(out_shape, e_NxD)
    res = pl.pallas_call(
        functools.partial(_seg_kernel, for_dc=for_dc, n=n, v=v, d=d, bn=bn, bv=bv, bq=bq, n_tiles=n_tiles,
                          v_tiles=v_tiles, precision=precision, has_bias=has_bias),
        grid=(pl.cdiv(d, bq), cap), in_specs=[any_spec] * len(args), out_specs=[any_spec] * len(out_shape),
        out_shape=out_shape, input_output_aliases={len(args) - len(outs) + k: k for k in range(len(outs))},
        compiler_params=params, interpret=spec.interpret, name="cce_bwd_seg",
    )(*args)
    if has_bias:
      out, db, carry_out, cb_out = res
    else:
      (out, carry_out), cb_out = res, cb_in
    return w + 1, out, db, carry_out, cb_out

  init = manual_axes.vary((jnp.int32(0), out, db, jnp.zeros((carry_rows, d), acc),
                           jnp.zeros((bv,), acc) if has_bias else None), manual_axes.axes(e_NxD))
  _, out, db, _, _ = lax.while_loop(lambda carry: carry[0] * cap < length, window, init)
  return out, db


def _windows(owner, length, cap, windows):
  """Per window of `cap` list entries, all at once: the runs' first slots [windows, cap + 1] (then the window's
  entry count) and the window information [windows, 5] (see `_FIRST_CONTINUES`...). owner: each list entry's
  output tile, [(windows + 1) * cap]; length: the list's length."""
  pos = jnp.arange(windows * cap)
  own = owner[:windows * cap]
  starts = (pos < length) & ((pos % cap == 0) | (own != jnp.concatenate([own[:1] - 1, own[:-1]])))
  starts = starts.reshape(windows, cap)
  k = jnp.arange(cap, dtype=jnp.int32)
  s0 = jnp.arange(windows, dtype=jnp.int32) * cap
  count = jnp.clip(length - s0, 0, cap)
  run_lo = jnp.sort(jnp.where(starts, k, cap), axis=1)
  run_lo = jnp.concatenate([jnp.where(run_lo == cap, count[:, None], run_lo), count[:, None]], axis=1)
  first = (s0 > 0) & (owner[jnp.maximum(s0 - 1, 0)] == owner[s0])
  last = (s0 + cap < length) & (owner[s0 + cap] == owner[s0 + cap - 1])
  info = jnp.stack([first, last, s0, jnp.broadcast_to(length, s0.shape), jnp.sum(starts, axis=1)], axis=1)
  return run_lo.astype(jnp.int32), info.astype(jnp.int32)


def backward(spec, residuals, row_cotangents, inv_r, keep):
  """(dE, dC, dbias, None) over the tiles where `keep` ([N tiles, V tiles] int32) is nonzero."""
  e_NxD, c_VxD, bias_V, targets_N = residuals[:4]
  cfg = spec.config
  n_tiles, v_tiles = keep.shape
  compute = jnp.result_type(e_NxD.dtype, c_VxD.dtype)
  cap = capacity(cfg, n_tiles, v_tiles, jnp.dtype(compute).itemsize)
  row_args = [targets_N.astype(jnp.int32), *residuals[4:6], *row_cotangents, inv_r]
  db = jnp.zeros(bias_V.shape, bias_V.dtype) if bias_V is not None else None
  dc, db = _sweep(spec, True, residuals, row_args, keep, jnp.zeros(c_VxD.shape, c_VxD.dtype), db, cap)
  de, _ = _sweep(spec, False, residuals, row_args, keep, jnp.zeros(e_NxD.shape, e_NxD.dtype), None, cap)
  return de, dc, db, None


def capacity(config, n_tiles: int, v_tiles: int, itemsize: int) -> int:
  """Tiles per window: as many dZ tiles as the buffer holds (`PallasGpuConfig.buffer_bytes`), at least one."""
  per_tile = config.block_n * config.block_v * itemsize
  return int(max(1, min(config.buffer_bytes // per_tile, n_tiles * v_tiles)))
