"""What the Mosaic TPU kernels of "pallas_tpu" share: the interpreter's parameters, the masks of the edge blocks
and the logit tile accumulated over hidden-size blocks.

Edge blocks. N, V and D need not be multiples of their blocks: Pallas reads the last block of a dimension past
the end of the array (on a TPU whatever the buffer holds there, in the interpreter NaN). Nothing read there may
reach a kept value: the hidden-size tail of e and c is zeroed before every GEMM (both operands: 0 * NaN is NaN),
rows and columns past N and V are selected away (`jnp.where`, never a multiplication), and the rows of e and c
that enter a gradient GEMM are zeroed. Writes past the end of an output are dropped by Pallas.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cce_jax.ops.linear_cross_entropy import base


def interpret_params(interpret: bool):
  """pallas_call's `interpret`: False (Mosaic compiles the kernel for the TPU), or the TPU interpreter's
  parameters: races not checked, an out-of-bounds read raises, uninitialised memory (and the padding of edge
  blocks) reads as NaN, so an unmasked edge shows in the results."""
  if not interpret:
    return False
  params = getattr(pltpu, "InterpretParams", None)
  if params is None:
    raise NotImplementedError("implementation='pallas_tpu' with interpret=True needs "
                              "jax.experimental.pallas.tpu.InterpretParams, missing from this jax")
  wanted = dict(detect_races=False, out_of_bounds_reads="raise", uninitialized_memory="nan")
  known = {f.name for f in dataclasses.fields(params)}
  return params(**{k: x for k, x in wanted.items() if k in known})


def compiler_params(semantics, vmem_limit_bytes, interpret: bool):
  """Mosaic's compiler parameters: the grid's dimension semantics and the scoped VMEM limit. The interpreter gets
  no semantics (every dimension in order): it does not extend them over the grid dimensions that vmap adds
  (jax 0.12), which Mosaic's lowering does."""
  return pltpu.CompilerParams(dimension_semantics=None if interpret else semantics,
                              vmem_limit_bytes=vmem_limit_bytes)


def index_column(start, shape):
  """start + row index, an int32 [rows, 1] column for a block of `shape` (rows, cols)."""
  return start + lax.broadcasted_iota(jnp.int32, (shape[0], 1), 0)


def index_row(start, size):
  """start + column index, an int32 [size] vector (1-D, as `base.tile_dlogits` takes the columns)."""
  return start + lax.iota(jnp.int32, size)


def zero_hidden_tail(x, k, block_d, d):
  """A [rows, block_d] block of e or c (hidden-size block k) with its columns at or past D zeroed."""
  if d % block_d == 0:
    return x
  cols = k * block_d + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.where(cols < d, x, jnp.zeros_like(x))


def zero_rows_past(x, start, size):
  """A block whose row r is row start + r of an array of `size` rows, with the rows past the end zeroed."""
  if size % x.shape[0] == 0:  # no block runs past the end
    return x
  return jnp.where(index_column(start, x.shape) < size, x, jnp.zeros_like(x))


def accumulate_logits(e_ref, c_ref, acc_ref, k, *, d, spec: base.StatsSpec):
  """acc_ref [bn, bv] (= or +=, from hidden-size block k) e_blk @ c_blk.T: the logit tile of the refs' token and
  vocabulary blocks, in acc_ref's dtype (fp32), the GEMM's operands in the inputs' promoted dtype."""
  block_d = e_ref.shape[1]
  compute = jnp.result_type(e_ref.dtype, c_ref.dtype)
  e_blk = zero_hidden_tail(e_ref[...], k, block_d, d).astype(compute)
  c_blk = zero_hidden_tail(c_ref[...], k, block_d, d).astype(compute)
  part = lax.dot_general(e_blk, c_blk, (((1,), (1,)), ((), ())), preferred_element_type=acc_ref.dtype,
                         precision=base.matmul_precision(spec))

  @pl.when(k == 0)
  def _():
    acc_ref[...] = part

  @pl.when(k != 0)
  def _():
    acc_ref[...] += part


def logits(acc_ref, b_ref, spec: base.StatsSpec):
  """(s, ds/dz) of the finished tile: z = acc (+ bias row) through `base.transform`; [bn, bv] each (ds/dz may be
  a scalar)."""
  z = acc_ref[...]
  if b_ref is not None:
    z = z + b_ref[...].astype(z.dtype)
  return base.transform(z, spec)


def check_dtypes(*arrays, interpret: bool):
  """Mosaic has no f64: f64 inputs run in the interpreter only (finite-difference checks)."""
  if interpret:
    return
  for x in arrays:
    if x is not None and jnp.dtype(x.dtype) == jnp.float64:
      raise ValueError("implementation='pallas_tpu' computes in fp32 on a TPU: f64 inputs need interpret=True or "
                       "implementation='xla_chunked'")
