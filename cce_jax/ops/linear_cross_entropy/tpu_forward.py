"""The Mosaic TPU forward of "pallas_tpu" (`cce_tpu_fwd`): the per-token statistics of `base.LogitStats`.

Grid (token blocks, vocabulary blocks, hidden-size blocks), the first parallel. Program (i, j, k) adds
e[i-block, k-block] @ c[j-block, k-block].T into an fp32 [block_n, block_v] VMEM tile; after the last hidden-size
block the tile is finished (bias, softcap, temperature: `base.transform`) and folded into the token block's
running state, also in VMEM: max m, sum of exp(s - m), target logit, logit sum and sum of exp(s - m)·s (an online
log-sum-exp over the vocabulary blocks). After the last vocabulary block the statistics are written, [N, 1]
each. No logits leave VMEM; the edge blocks are masked (`tpu_tiles`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import kernel_refs
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import tpu_tiles
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig


def logit_stats(spec: base.StatsSpec, config: PallasTpuConfig, e_NxD, c_VxD, bias_V, targets_N, *,
                interpret: bool):
  """(lse, target_logit, sum_logits, mean_logit), each [N] in the accumulation dtype (fp32; f64 for f64 inputs
  in the interpreter); sum_logits and mean_logit are zeros unless the spec asks for them.

  e_NxD [N, D], c_VxD [V, D] (bf16, f16 or f32, may differ), bias_V [V] or None, targets_N [N] int (outside
  [0, V): no target column, target_logit 0); the blocks are config.tiles(N, V, D).
  """
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  tiles = config.tiles(n, v, d)
  bn, bv, bd = tiles.block_n, tiles.block_v, tiles.block_d
  acc = base.acc_dtype(e_NxD.dtype, c_VxD.dtype)
  grid = (pl.cdiv(n, bn), pl.cdiv(v, bv), pl.cdiv(d, bd))
  has_bias = bias_V is not None
  column = jax.ShapeDtypeStruct((n, 1), acc)
  outs = [column] * (2 + spec.with_sum + spec.with_mean)
  in_specs = [pl.BlockSpec((bn, bd), lambda i, j, k: (i, k)), pl.BlockSpec((bv, bd), lambda i, j, k: (j, k))]
  args = [e_NxD, c_VxD]
  if has_bias:
    in_specs.append(pl.BlockSpec((1, bv), lambda i, j, k: (0, j)))
    args.append(bias_V.reshape(1, v))
  in_specs.append(pl.BlockSpec((bn, 1), lambda i, j, k: (i, 0)))
  args.append(targets_N.astype(jnp.int32).reshape(n, 1))
  itemsize = max(jnp.dtype(e_NxD.dtype).itemsize, jnp.dtype(c_VxD.dtype).itemsize)
  results = pl.pallas_call(
      functools.partial(_kernel, spec=spec, n=n, v=v, d=d, has_bias=has_bias),
      grid=grid,
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((bn, 1), lambda i, j, k: (i, 0))] * len(outs),
      out_shape=manual_axes.kernel_out(outs, e_NxD),
      scratch_shapes=[pltpu.VMEM((bn, bv), acc)] + [pltpu.VMEM((bn, 1), acc)] * 5,
      compiler_params=tpu_tiles.compiler_params(
          ("parallel", "arbitrary", "arbitrary"), config.vmem_limit(tiles.forward_vmem(itemsize)), interpret),
      interpret=tpu_tiles.interpret_params(interpret),
      name="cce_tpu_fwd",
  )(*args)
  results = iter(r[:, 0] for r in results)
  lse, target = next(results), next(results)
  zeros = jnp.zeros_like(lse)
  total = next(results) if spec.with_sum else zeros
  mean = next(results) if spec.with_mean else zeros
  return lse, target, total, mean


def _kernel(*refs, spec, n, v, d, has_bias):
  (e_ref, c_ref, b_ref, t_ref, lse_ref, st_ref, sum_ref, mean_ref, acc_ref, m_sc, l_sc, st_sc, sum_sc,
   w_sc) = kernel_refs.unpack(
       refs, e=True, c=True, bias=has_bias, targets=True, lse=True, target=True, sum=spec.with_sum,
       mean=spec.with_mean, acc=True, m=True, l=True, st=True, ssum=True, w=True)
  j, k = pl.program_id(1), pl.program_id(2)
  nj, nk = pl.num_programs(1), pl.num_programs(2)
  del n  # rows past N are computed on padding and dropped when the output block is written
  tpu_tiles.accumulate_logits(e_ref, c_ref, acc_ref, k, d=d, spec=spec)

  @pl.when(k == nk - 1)
  def _fold_tile():
    @pl.when(j == 0)
    def _():
      m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
      for ref in (l_sc, st_sc, sum_sc, w_sc):
        ref[...] = jnp.zeros_like(ref)

    s, _ = tpu_tiles.logits(acc_ref, b_ref, spec)
    bv = s.shape[1]
    cols = tpu_tiles.index_row(j * bv, bv)[None, :]
    col_ok = cols < v
    s_live = jnp.where(col_ok, s, -jnp.inf)
    s_zero = jnp.where(col_ok, s, 0.0)
    m_old = m_sc[...]
    m_new = jnp.maximum(m_old, jnp.max(s_live, axis=1, keepdims=True))
    rescale = jnp.exp(m_old - m_new)
    p = jnp.exp(s_live - m_new)
    m_sc[...] = m_new
    l_sc[...] = l_sc[...] * rescale + jnp.sum(p, axis=1, keepdims=True)
    st_sc[...] += jnp.sum(jnp.where(cols == t_ref[...], s_zero, 0.0), axis=1, keepdims=True)
    if spec.with_sum:
      sum_sc[...] += jnp.sum(s_zero, axis=1, keepdims=True)
    if spec.with_mean:
      w_sc[...] = w_sc[...] * rescale + jnp.sum(p * s_zero, axis=1, keepdims=True)

    @pl.when(j == nj - 1)
    def _write():
      lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])
      st_ref[...] = st_sc[...]
      if spec.with_sum:
        sum_ref[...] = sum_sc[...]
      if spec.with_mean:
        mean_ref[...] = w_sc[...] / l_sc[...]
