"""The blockwise backward of the per-token statistics (`base`) in plain XLA: the backward of "xla_chunked", and
the dense backward of "pallas_gpu" where its Mosaic GPU kernel does not run.

Per [block_n, block_v] block (from the tile config) it recomputes the logits, forms dS (`base.tile_dlogits`) and
dZ = dS * ds/dz, and accumulates dE = dZ @ c and dC = dZ.T @ e with fp32 accumulation. With `filter_eps` a block
whose |dS| / max(|g_lse|, |g_target|, |g_mean|) is below it everywhere skips its two GEMMs (`lax.cond`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig


def backward(spec: base.StatsSpec, config: XlaChunkedConfig, residuals, cotangents):
  """(dE, dC, dbias, None) of the statistics from their residuals (e, c, bias, targets, lse, mean) and the four
  per-token cotangents, over [config.block_n, config.block_v] blocks (a config clamped to (N, V))."""
  e_NxD, c_VxD, bias_V, targets_N, lse, mean = residuals
  (g_lse, g_st, g_sum, g_mean), inv_row_scale = base.backward_cotangents(spec, residuals, cotangents)
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  bn, bv = config.block_n, config.block_v
  acc = lse.dtype
  # dZ goes into the gradient GEMMs in the inputs' dtype (as the logits GEMM takes e and c), fp32 accumulation.
  mm = jnp.result_type(e_NxD.dtype, c_VxD.dtype)
  # Rows with no cotangent contribute nothing; masking them also keeps NaNs of ignored rows out of dC. A NaN
  # cotangent (a token with an out-of-range target) stays live, so the NaN reaches the gradients.
  row_live = (inv_row_scale != 0) | (g_sum != 0)

  def tile_grads(e_blk, c_blk, dz):
    dz_mm = dz.astype(mm)
    de = lax.dot_general(dz_mm, c_blk.astype(mm), (((1,), (0,)), ((), ())),
                         preferred_element_type=acc, precision=base.matmul_precision(spec))
    dc = lax.dot_general(dz_mm, e_blk.astype(mm), (((0,), (0,)), ((), ())),
                         preferred_element_type=acc, precision=base.matmul_precision(spec))
    return de, dc, jnp.sum(dz, axis=0)

  def v_step(carry, j):
    de_acc, dc, db = carry
    v_start, c_blk, b_blk, cols, col_new = base.vocab_block(j, bv, c_VxD, bias_V)

    def n_step(carry, i):
      de_acc, dc_blk, db_blk = carry
      n_start, n_first = base.block_start(i, bn, n)
      rows = lambda x: lax.dynamic_slice(x, (n_start,), (bn,))
      row_ok = ((n_start + jnp.arange(bn)) >= n_first) & rows(row_live)
      e_blk = lax.dynamic_slice(e_NxD, (n_start, 0), (bn, d))
      s, dsdz = base.transform(base.logit_tile(e_blk, c_blk, b_blk, spec, acc), spec)
      col = lambda x: rows(x)[:, None]
      ds = base.tile_dlogits(s, cols, col(targets_N), col(lse), col(mean), col(g_lse), col(g_st), col(g_sum),
                        col(g_mean), spec)
      ds = jnp.where(row_ok[:, None] & col_new[None, :], ds, 0.0)
      dz = ds * dsdz
      if spec.filter_eps is None:
        de_t, dc_t, db_t = tile_grads(e_blk, c_blk, dz)
      else:
        keep = ~(jnp.max(jnp.abs(ds) * rows(inv_row_scale)[:, None]) < spec.filter_eps)
        de_t, dc_t, db_t = lax.cond(
            keep, tile_grads,
            lambda *_: manual_axes.vary((jnp.zeros((bn, d), acc), jnp.zeros((bv, d), acc), jnp.zeros((bv,), acc)),
                                        manual_axes.axes(e_NxD)),
            e_blk, c_blk, dz)
      de_acc = lax.dynamic_update_slice(
          de_acc, lax.dynamic_slice(de_acc, (n_start, 0), (bn, d)) + de_t, (n_start, 0))
      return (de_acc, dc_blk + dc_t, db_blk + db_t), None

    blk_init = manual_axes.vary((jnp.zeros((bv, d), acc), jnp.zeros((bv,), acc)), manual_axes.axes(e_NxD))
    (de_acc, dc_blk, db_blk), _ = lax.scan(n_step, (de_acc,) + blk_init, jnp.arange(base.cdiv(n, bn)))
    # Each column is final after its block; the columns a moved-back last block revisits hold zeros in
    # dc_blk, so adding them into the earlier values is exact in any dtype.
    dc = lax.dynamic_update_slice(
        dc, lax.dynamic_slice(dc, (v_start, 0), (bv, d)) + dc_blk.astype(dc.dtype), (v_start, 0))
    if db is not None:
      db = lax.dynamic_update_slice(
          db, lax.dynamic_slice(db, (v_start,), (bv,)) + db_blk.astype(db.dtype), (v_start,))
    return (de_acc, dc, db), None

  init = manual_axes.vary((
      jnp.zeros((n, d), acc),
      jnp.zeros(c_VxD.shape, c_VxD.dtype),
      None if bias_V is None else jnp.zeros(bias_V.shape, bias_V.dtype),
  ), manual_axes.axes(e_NxD))
  (de_acc, dc, db), _ = lax.scan(v_step, init, jnp.arange(base.cdiv(v, bv)))
  return de_acc.astype(e_NxD.dtype), dc, db, None
