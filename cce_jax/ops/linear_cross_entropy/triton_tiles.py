"""Tile helpers shared by the Pallas-Triton kernels: logit tiles built from D chunks, and the matmul precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from cce_jax.ops.linear_cross_entropy import base


def logit_chunk(e_ref, c_ref, n_start, v_start, k, *, bn, bv, bd, d, precision):
  """The D chunk k of e[n_start:+bn] @ c[v_start:+bv].T: a [bn, bv] fp32 partial product."""
  compute = jnp.result_type(e_ref.dtype, c_ref.dtype)
  d_start, d_first = base.block_start(k, bd, d)
  e_blk = e_ref[pl.ds(n_start, bn), pl.ds(d_start, bd)].astype(compute)
  c_blk = c_ref[pl.ds(v_start, bv), pl.ds(d_start, bd)].astype(compute)
  if d % bd:  # the moved-back last chunk must not count its first columns twice
    e_blk = jnp.where((d_start + jnp.arange(bd) >= d_first)[None, :], e_blk, jnp.zeros_like(e_blk))
  return lax.dot_general(e_blk, c_blk, (((1,), (1,)), ((), ())),
                         preferred_element_type=base.acc_dtype(compute), precision=precision)


def logit_tile(e_ref, c_ref, n_start, v_start, *, bn, bv, bd, d, precision):
  """z = e[n_start:+bn] @ c[v_start:+bv].T as a [bn, bv] fp32 tile, walking D in chunks of bd."""
  acc = base.acc_dtype(jnp.result_type(e_ref.dtype, c_ref.dtype))
  # int32 bounds keep the loop index int32 (index arithmetic must not mix widths under jax_enable_x64).
  steps = (jnp.int32(0), jnp.int32(pl.cdiv(d, bd)))
  if bn < 64 <= bv:  # z.T = c @ e.T: M = bv, as Hopper's wgmma needs M >= 64 (H200 llama3_8b_4k random, 32-token
    # tiles: low-memory dC sweep 14.8 -> 13.6 ms)
    body = lambda k, zt: zt + logit_chunk(c_ref, e_ref, v_start, n_start, k, bn=bv, bv=bn, bd=bd, d=d,
                                          precision=precision)
    return lax.fori_loop(*steps, body, jnp.zeros((bv, bn), acc)).T
  body = lambda k, z: z + logit_chunk(e_ref, c_ref, n_start, v_start, k, bn=bn, bv=bv, bd=bd, d=d,
                                      precision=precision)
  return lax.fori_loop(*steps, body, jnp.zeros((bn, bv), acc))


_PRECISION_NAMES = {
    "highest": lax.Precision.HIGHEST, "float32": lax.Precision.HIGHEST,
    "high": lax.Precision.HIGH, "tensorfloat32": lax.Precision.HIGH, "bfloat16_3x": lax.Precision.HIGH,
    "default": lax.Precision.DEFAULT, "bfloat16": lax.Precision.DEFAULT, "fastest": lax.Precision.DEFAULT,
}


def precision(stats_spec):
  """HIGHEST for exact mode; else the user's `jax_default_matmul_precision` (TF32 for f32 inputs if unset)."""
  if stats_spec.exact:
    return lax.Precision.HIGHEST
  return _PRECISION_NAMES.get(jax.config.jax_default_matmul_precision)
