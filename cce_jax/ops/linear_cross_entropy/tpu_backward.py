"""The split Mosaic TPU backward of "pallas_tpu" (`PallasTpuConfig.backward="split"`): dE (`cce_tpu_de`) and dC
with the bias gradient (`cce_tpu_dc`); also the per-token array and the dZ tile that the fused backward
(`tpu_fused_backward`, the default) shares.

Two kernels, each recomputing the logit tiles (no N×V array; five N·V·D GEMMs in forward and backward, the fused
backward's four plus one; no read-modify-write of a gradient in HBM).

`cce_tpu_de`, grid (token blocks i, vocabulary blocks j, stage, hidden-size blocks k); `cce_tpu_dc` the same with
the first two swapped. Stage 0 accumulates the [block_n, block_v] logit tile over k in fp32 VMEM; at the first k
of stage 1 the tile becomes dZ = dS · ds/dz (`base.tile_dlogits`; rows past N, columns past V and rows without
a cotangent selected away), kept in VMEM in the GEMM dtype; stage 1 then adds dZ @ c[j, k] into the fp32 row
block of dE (resp. dZ.T @ e[i, k] into that of dC, and dZ's column sums into the bias gradient). The row block
[block_n, D] (resp. [block_v, D]) is the kernel's output block, resident in VMEM across the inner dimensions and
written to HBM once; the fp32 result is cast to the input's dtype outside.

Gradient filtering (`filter_eps`): a tile whose |dS| / max(|g_lse|, |g_target|, |g_mean|) is below filter_eps
everywhere skips its gradient GEMMs (`pl.when`), the criterion of `xla_backward`; its logits are still computed.
Deterministic: every sum has a fixed order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import kernel_refs
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import tpu_tiles
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig

# Columns of the per-token array the kernels read ([N, len(ROW_FIELDS)], accumulation dtype).
ROW_FIELDS = ("lse", "mean", "g_lse", "g_target", "g_sum", "g_mean", "inv_row_scale", "live")


def gradients(spec: base.StatsSpec, config: PallasTpuConfig, residuals, cotangents, *, interpret: bool):
  """(dE, dC, dbias, None) of the statistics from the residuals (e, c, bias, targets, lse, mean) and the four
  per-token cotangents; dE [N, D] in e's dtype, dC [V, D] in c's, dbias [V] in the bias's (or None)."""
  e_NxD, c_VxD, bias_V, targets_N = residuals[:4]
  rows_NxF = pack_rows(spec, residuals, cotangents)
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  targets_Nx1 = targets_N.astype(jnp.int32).reshape(n, 1)
  bias_1xV = None if bias_V is None else bias_V.reshape(1, v)
  de = _call(spec, config, "de", e_NxD, c_VxD, bias_1xV, targets_Nx1, rows_NxF, interpret)[0]
  dc, db = _call(spec, config, "dc", e_NxD, c_VxD, bias_1xV, targets_Nx1, rows_NxF, interpret)
  de = de[:, :d].astype(e_NxD.dtype)
  dc = dc[:, :d].astype(c_VxD.dtype)
  db = None if bias_V is None else db[0].astype(bias_V.dtype)
  return de, dc, db, None


def pack_rows(spec: base.StatsSpec, residuals, cotangents):
  """The per-token array the backward kernels read: [N, len(ROW_FIELDS)] in the accumulation dtype."""
  lse, mean = residuals[4], residuals[5]
  (g_lse, g_st, g_sum, g_mean), inv_row_scale = base.backward_cotangents(spec, residuals, cotangents)
  # Rows without a cotangent add nothing; selecting them away also keeps an ignored row's NaN out of dC. A NaN
  # cotangent (an out-of-range target) stays live, so the NaN reaches the gradients.
  live = ((inv_row_scale != 0) | (g_sum != 0)).astype(lse.dtype)
  return jnp.stack([lse, mean, g_lse, g_st, g_sum, g_mean, inv_row_scale, live], axis=1)


def tile_dz(acc_ref, b_ref, t_ref, rows_ref, i, j, *, n, v, spec: base.StatsSpec):
  """(dZ, keep) of the finished logit tile of token block i and vocabulary block j: dZ = dS · ds/dz [bn, bv] in
  the accumulation dtype, zero in rows past N, columns past V and rows without a cotangent; keep an int32 scalar,
  0 where the tile is below spec.filter_eps everywhere (its gradient GEMMs may be skipped), else 1."""
  bn, bv = acc_ref.shape
  s, dsdz = tpu_tiles.logits(acc_ref, b_ref, spec)
  row_ok = tpu_tiles.index_column(i * bn, (bn, 1)) < n
  rows = jnp.where(row_ok, rows_ref[...], 0.0)
  col = lambda name: rows[:, ROW_FIELDS.index(name):ROW_FIELDS.index(name) + 1]
  cols = tpu_tiles.index_row(j * bv, bv)
  ds = base.tile_dlogits(s, cols, t_ref[...], col("lse"), col("mean"), col("g_lse"), col("g_target"),
                         col("g_sum"), col("g_mean"), spec)
  ok = row_ok & (col("live") != 0) & (cols[None, :] < v)
  # Select after every product: ds/dz is NaN wherever the tile was read past N or V.
  ds = jnp.where(ok, ds, 0.0)
  dz = jnp.where(ok, ds * dsdz, 0.0)
  if spec.filter_eps is None:
    keep = jnp.int32(1)
  else:
    keep = jnp.where(jnp.max(jnp.abs(ds) * col("inv_row_scale")) < spec.filter_eps, 0, 1).astype(jnp.int32)
  return dz, keep


def _call(spec, config, which, e_NxD, c_VxD, bias_1xV, targets_Nx1, rows_NxF, interpret):
  """One gradient kernel: "de" -> [fp32 dE padded to whole hidden-size blocks]; "dc" -> [fp32 dC padded alike,
  fp32 [1, V] dbias or None]."""
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  tiles = config.tiles(n, v, d)
  bn, bv, bd = tiles.grad_block_n, tiles.grad_block_v, tiles.grad_block_d
  acc = rows_NxF.dtype
  nk = pl.cdiv(d, bd)
  width = nk * bd
  has_bias = bias_1xV is not None
  if which == "de":  # grid (i, j, stage, k)
    grid = (pl.cdiv(n, bn), pl.cdiv(v, bv), 2, nk)
    tok = lambda f: lambda i, j, s, k: f(i, j, k)
    outs = [jax.ShapeDtypeStruct((n, width), acc)]
    out_specs = [pl.BlockSpec((bn, width), lambda i, j, s, k: (i, 0))]
  else:  # grid (j, i, stage, k)
    grid = (pl.cdiv(v, bv), pl.cdiv(n, bn), 2, nk)
    tok = lambda f: lambda j, i, s, k: f(i, j, k)
    outs = [jax.ShapeDtypeStruct((v, width), acc)]
    out_specs = [pl.BlockSpec((bv, width), lambda j, i, s, k: (j, 0))]
    if has_bias:
      outs.append(jax.ShapeDtypeStruct((1, v), acc))
      out_specs.append(pl.BlockSpec((1, bv), lambda j, i, s, k: (0, j)))
  in_specs = [pl.BlockSpec((bn, bd), tok(lambda i, j, k: (i, k))),
              pl.BlockSpec((bv, bd), tok(lambda i, j, k: (j, k)))]
  args = [e_NxD, c_VxD]
  if has_bias:
    in_specs.append(pl.BlockSpec((1, bv), tok(lambda i, j, k: (0, j))))
    args.append(bias_1xV)
  in_specs += [pl.BlockSpec((bn, 1), tok(lambda i, j, k: (i, 0))),
               pl.BlockSpec((bn, len(ROW_FIELDS)), tok(lambda i, j, k: (i, 0)))]
  args += [targets_Nx1, rows_NxF]
  mm = jnp.result_type(e_NxD.dtype, c_VxD.dtype)
  itemsize = max(jnp.dtype(e_NxD.dtype).itemsize, jnp.dtype(c_VxD.dtype).itemsize)
  results = pl.pallas_call(
      functools.partial(_kernel, spec=spec, which=which, n=n, v=v, d=d, has_bias=has_bias),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=manual_axes.kernel_out(outs, e_NxD),
      scratch_shapes=[pltpu.VMEM((bn, bv), acc), pltpu.VMEM((bn, bv), mm), pltpu.SMEM((1,), jnp.int32)],
      compiler_params=tpu_tiles.compiler_params(
          ("parallel", "arbitrary", "arbitrary", "arbitrary"), config.vmem_limit(tiles.backward_vmem(d, itemsize)),
          interpret),
      interpret=tpu_tiles.interpret_params(interpret),
      name=f"cce_tpu_{which}",
  )(*args)
  return list(results) + [None] * (2 - len(results))


def _kernel(*refs, spec, which, n, v, d, has_bias):
  with_db = which == "dc" and has_bias
  (e_ref, c_ref, b_ref, t_ref, rows_ref, out_ref, db_ref, acc_ref, dz_ref, keep_ref) = kernel_refs.unpack(
      refs, e=True, c=True, bias=has_bias, targets=True, rows=True, out=True, db=with_db, acc=True, dz=True,
      keep=True)
  if which == "de":
    i, j = pl.program_id(0), pl.program_id(1)
    first_visit = j == 0
  else:
    j, i = pl.program_id(0), pl.program_id(1)
    first_visit = i == 0
  stage, k = pl.program_id(2), pl.program_id(3)
  bn, bd = e_ref.shape
  bv = c_ref.shape[0]

  @pl.when(first_visit & (stage == 0) & (k == 0))
  def _init():
    out_ref[...] = jnp.zeros_like(out_ref)
    if with_db:
      db_ref[...] = jnp.zeros_like(db_ref)

  @pl.when(stage == 0)
  def _logits():
    tpu_tiles.accumulate_logits(e_ref, c_ref, acc_ref, k, d=d, spec=spec)

  @pl.when((stage == 1) & (k == 0))
  def _dlogits():
    dz, keep_ref[0] = tile_dz(acc_ref, b_ref, t_ref, rows_ref, i, j, n=n, v=v, spec=spec)
    dz_ref[...] = dz.astype(dz_ref.dtype)
    if with_db:
      @pl.when(keep_ref[0] != 0)
      def _():
        db_ref[...] += jnp.sum(dz, axis=0, keepdims=True)

  @pl.when((stage == 1) & (keep_ref[0] != 0))
  def _gradient():
    precision = base.matmul_precision(spec)
    dz = dz_ref[...]
    if which == "de":  # dE[i, k-block] += dZ @ c[j, k-block]
      c_blk = tpu_tiles.zero_rows_past(tpu_tiles.zero_hidden_tail(c_ref[...], k, bd, d), j * bv, v)
      part = lax.dot_general(dz, c_blk.astype(dz.dtype), (((1,), (0,)), ((), ())),
                             preferred_element_type=out_ref.dtype, precision=precision)
    else:  # dC[j, k-block] += dZ.T @ e[i, k-block]
      e_blk = tpu_tiles.zero_rows_past(tpu_tiles.zero_hidden_tail(e_ref[...], k, bd, d), i * bn, n)
      part = lax.dot_general(dz, e_blk.astype(dz.dtype), (((0,), (0,)), ((), ())),
                             preferred_element_type=out_ref.dtype, precision=precision)
    start = pl.multiple_of(k * bd, bd) if out_ref.shape[1] > bd else 0
    out_ref[:, pl.ds(start, bd)] += part
