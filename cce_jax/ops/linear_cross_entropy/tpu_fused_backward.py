"""The fused Mosaic TPU backward of "pallas_tpu" (`cce_tpu_bwd`): dE, dC and the bias gradient from one kernel.

Each [grad_block_n, grad_block_v] logit tile is recomputed once and feeds both gradient GEMMs: four N·V·D GEMMs
in forward and backward (the split backward of `tpu_backward`, two kernels, recomputes every tile twice: five).
Not measured on a TPU: the choice between the two (`PallasTpuConfig.backward`) follows `tpu_roofline`.

Grid (cores p, vocabulary blocks j, token blocks i, stage, hidden-size blocks k); the vocabulary block of
program (p, j, ...) is jj = p · cdiv(nj, cores) + j. Stage 0 accumulates the logit tile over k in fp32 VMEM; at
the first k of stage 1 it becomes dZ (`tpu_backward.tile_dz`: the same masks and filter criterion), kept in VMEM
in the GEMM dtype; stage 1 then adds, for each hidden-size block k, dZ.T @ e[i, k] into dC and dZ @ c[jj, k]
into dE.

- Which gradient stays in VMEM. dC: its fp32 row block [grad_block_v, D] is the kernel's output block for
  vocabulary block jj, resident across the inner (i, stage, k) loops and written to HBM once. dE is
  read-modify-written, once per vocabulary block: an fp32 [grad_block_n, grad_block_d] tile is read from HBM (a
  DMA started before the tile's GEMMs and waited after them), added to and written back (a DMA waited by the
  next step that writes a dE tile, so it overlaps the work in between: the next tile's logits when D is one
  block). With the vocabulary outermost that moves 8 bytes per dE entry per vocabulary block,
  8 · N · D · cdiv(V, grad_block_v) in all; dC outermost would move 8 · V · D · cdiv(N, grad_block_n), more
  wherever V > N, and would need an fp32 [V, D] accumulator in HBM (4 GiB at V 256k, D 4096) where dE's is small.
- Accumulator memory: fp32 [cores, cdiv(N, bn) · bn, cdiv(D, bd) · bd] in HBM (output in `pl.ANY`, 128 MiB
  per core at N 8192, D 4096), summed over the cores and cast to e's dtype outside the kernel; the fp32 [V, D]
  dC and [1, V] bias gradient are the kernel's outputs, cast alike. The vocabulary block of program j == 0 of
  each core writes its dE tiles instead of adding (zeros where filtered), so no zero-filled input is needed.
- Cores. The leading grid dimension is "parallel": on the megacore chips (v4, v5p, `TpuGeneration.cores` 2)
  each TensorCore takes half of the vocabulary blocks into its own dE partial, so no tile is written by two
  cores; every other dimension is "arbitrary" (sequential), as the read-modify-write requires. When the
  vocabulary blocks do not split evenly, the last core's spare programs (jj >= nj) read block nj - 1 again and
  compute nothing.
- Determinism: every sum has a fixed order (dE over the vocabulary blocks of a core in order, then over the
  cores in order; dC and the bias gradient over the token blocks in order).
- Filtering: a tile below filter_eps (`tpu_backward`'s criterion) skips both gradient GEMMs, its bias-gradient
  sum and its dE read-modify-write; its logits are still computed.
- Ragged edges: the same as the split kernels (`tpu_tiles`): hidden-size tails zeroed before each GEMM, rows
  past N and columns past V selected out of dZ, the rows of e and c entering a gradient GEMM zeroed. The dE
  accumulator is padded to whole blocks, so its DMAs never leave it; reads of e and c past their ends are those
  of Pallas's edge blocks, never out of bounds.
- vmap: the kernel runs once per batch entry (`lax.map`), as vmap's extra grid dimension cannot block the dE
  accumulator in `pl.ANY`.
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
from cce_jax.ops.linear_cross_entropy import tpu_backward
from cce_jax.ops.linear_cross_entropy import tpu_tiles
from cce_jax.ops.linear_cross_entropy.tpu_config import GENERATIONS
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig


def gradients(spec: base.StatsSpec, config: PallasTpuConfig, residuals, cotangents, *, interpret: bool):
  """(dE, dC, dbias, None) as `tpu_backward.gradients`, from one kernel."""
  e_NxD, c_VxD, bias_V, targets_N = residuals[:4]
  rows_NxF = tpu_backward.pack_rows(spec, residuals, cotangents)
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  tiles = config.tiles(n, v, d)
  bn, bv, bd = tiles.grad_block_n, tiles.grad_block_v, tiles.grad_block_d
  ni, nj, nk = pl.cdiv(n, bn), pl.cdiv(v, bv), pl.cdiv(d, bd)
  cores = min(GENERATIONS[config.generation].cores, nj)
  per_core = pl.cdiv(nj, cores)
  acc = rows_NxF.dtype
  width = nk * bd
  has_bias = bias_V is not None
  block_j = lambda p, j: jnp.minimum(p * per_core + j, nj - 1)
  in_specs = [pl.BlockSpec((bn, bd), lambda p, j, i, s, k: (i, k)),
              pl.BlockSpec((bv, bd), lambda p, j, i, s, k: (block_j(p, j), k))]
  args = [e_NxD, c_VxD]
  if has_bias:
    in_specs.append(pl.BlockSpec((1, bv), lambda p, j, i, s, k: (0, block_j(p, j))))
    args.append(bias_V.reshape(1, v))
  in_specs += [pl.BlockSpec((bn, 1), lambda p, j, i, s, k: (i, 0)),
               pl.BlockSpec((bn, len(tpu_backward.ROW_FIELDS)), lambda p, j, i, s, k: (i, 0))]
  args += [targets_N.astype(jnp.int32).reshape(n, 1), rows_NxF]
  outs = [jax.ShapeDtypeStruct((cores, ni * bn, width), acc), jax.ShapeDtypeStruct((v, width), acc)]
  out_specs = [pl.BlockSpec(memory_space=pl.ANY),
               pl.BlockSpec((bv, width), lambda p, j, i, s, k: (block_j(p, j), 0))]
  if has_bias:
    outs.append(jax.ShapeDtypeStruct((1, v), acc))
    out_specs.append(pl.BlockSpec((1, bv), lambda p, j, i, s, k: (0, block_j(p, j))))
  mm = jnp.result_type(e_NxD.dtype, c_VxD.dtype)
  itemsize = max(jnp.dtype(e_NxD.dtype).itemsize, jnp.dtype(c_VxD.dtype).itemsize)
  call = pl.pallas_call(
      functools.partial(_kernel, spec=spec, n=n, v=v, d=d, nj=nj, per_core=per_core, has_bias=has_bias),
      grid=(cores, per_core, ni, 2, nk),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=manual_axes.kernel_out(outs, e_NxD),
      scratch_shapes=[pltpu.VMEM((bn, bv), acc), pltpu.VMEM((bn, bv), mm), pltpu.SMEM((1,), jnp.int32),
                      pltpu.VMEM((bn, bd), acc), pltpu.SMEM((1,), jnp.int32), pltpu.SemaphoreType.DMA((2,))],
      compiler_params=tpu_tiles.compiler_params(
          ("parallel", "arbitrary", "arbitrary", "arbitrary", "arbitrary"),
          config.vmem_limit(tiles.fused_backward_vmem(d, itemsize)), interpret),
      interpret=tpu_tiles.interpret_params(interpret),
      name="cce_tpu_bwd",
  )
  results = _loop_under_vmap(lambda *xs: tuple(call(*xs)))(*args)
  de_parts, dc = results[0], results[1]
  de = de_parts[0]
  for part in range(1, cores):  # a fixed order
    de = de + de_parts[part]
  de = de[:n, :d].astype(e_NxD.dtype)
  dc = dc[:, :d].astype(c_VxD.dtype)
  db = results[2][0].astype(bias_V.dtype) if has_bias else None
  return de, dc, db, None


def _loop_under_vmap(fn):
  """fn, which under vmap runs once per batch entry (`lax.map`) instead of vmap's extra grid dimension: that
  dimension would need a block of the dE accumulator, which lives unblocked in `pl.ANY`."""
  batchable = jax.custom_batching.custom_vmap(fn)

  @batchable.def_vmap
  def _rule(axis_size, in_batched, *args):
    del axis_size
    def one(batched):
      entries = iter(batched)
      return batchable(*[next(entries) if b else x for x, b in zip(args, in_batched)])
    out = lax.map(one, [x for x, b in zip(args, in_batched) if b])
    return out, tuple(True for _ in out)

  return batchable


def _kernel(*refs, spec, n, v, d, nj, per_core, has_bias):
  (e_ref, c_ref, b_ref, t_ref, rows_ref, de_hbm, dc_ref, db_ref, acc_ref, dz_ref, keep_ref, de_tile,
   pending_ref, sems) = kernel_refs.unpack(
       refs, e=True, c=True, bias=has_bias, targets=True, rows=True, de=True, dc=True, db=has_bias, acc=True,
       dz=True, keep=True, de_tile=True, pending=True, sems=True)
  p, j, i, stage, k = (pl.program_id(axis) for axis in range(5))
  jj = p * per_core + j
  real = jj < nj  # the last core's spare programs compute nothing
  bn, bd = e_ref.shape
  bv = c_ref.shape[0]

  @pl.when((j == 0) & (i == 0) & (stage == 0) & (k == 0))
  def _start_of_core():
    pending_ref[0] = jnp.int32(0)  # no dE write in flight

  @pl.when(real & (i == 0) & (stage == 0) & (k == 0))
  def _init():
    dc_ref[...] = jnp.zeros_like(dc_ref)
    if has_bias:
      db_ref[...] = jnp.zeros_like(db_ref)

  @pl.when(real & (stage == 0))
  def _logits():
    tpu_tiles.accumulate_logits(e_ref, c_ref, acc_ref, k, d=d, spec=spec)

  @pl.when(real & (stage == 1) & (k == 0))
  def _dlogits():
    dz, keep_ref[0] = tpu_backward.tile_dz(acc_ref, b_ref, t_ref, rows_ref, i, jj, n=n, v=v, spec=spec)
    dz_ref[...] = dz.astype(dz_ref.dtype)
    if has_bias:
      @pl.when(keep_ref[0] != 0)
      def _():
        db_ref[...] += jnp.sum(dz, axis=0, keepdims=True)

  row0 = pl.multiple_of(i * bn, bn) if de_hbm.shape[1] > bn else 0
  col0 = pl.multiple_of(k * bd, bd) if de_hbm.shape[2] > bd else 0
  de_slice = de_hbm.at[p, pl.ds(row0, bn), pl.ds(col0, bd)]
  read = pltpu.make_async_copy(de_slice, de_tile, sems.at[0])
  write = pltpu.make_async_copy(de_tile, de_slice, sems.at[1])
  grad_step = real & (stage == 1)
  kept = grad_step & (keep_ref[0] != 0)
  first = j == 0  # this core's first vocabulary block writes its dE tiles, later ones add to them
  writes = kept | (grad_step & first)

  # The previous dE write still reads de_tile (and may target the tile read next): wait for it first. A wait
  # needs the semaphore and the copy's size, which every step's tile shares.
  @pl.when(writes & (pending_ref[0] != 0))
  def _drain():
    write.wait()
    pending_ref[0] = jnp.int32(0)

  @pl.when(kept & ~first)
  def _read():
    read.start()

  @pl.when(kept)
  def _gradients():
    precision = base.matmul_precision(spec)
    dz = dz_ref[...]
    e_blk = tpu_tiles.zero_rows_past(tpu_tiles.zero_hidden_tail(e_ref[...], k, bd, d), i * bn, n)
    c_blk = tpu_tiles.zero_rows_past(tpu_tiles.zero_hidden_tail(c_ref[...], k, bd, d), jj * bv, v)
    dc_ref[:, pl.ds(col0, bd)] += lax.dot_general(dz, e_blk.astype(dz.dtype), (((0,), (0,)), ((), ())),
                                                  preferred_element_type=dc_ref.dtype, precision=precision)
    part = lax.dot_general(dz, c_blk.astype(dz.dtype), (((1,), (0,)), ((), ())),
                           preferred_element_type=de_tile.dtype, precision=precision)

    @pl.when(first)
    def _():
      de_tile[...] = part

    @pl.when(~first)
    def _():
      read.wait()
      de_tile[...] += part

  @pl.when(grad_step & first & (keep_ref[0] == 0))
  def _zeros():
    de_tile[...] = jnp.zeros_like(de_tile)

  @pl.when(writes)
  def _write():
    write.start()  # waited by the next step that writes, or at the core's last step
    pending_ref[0] = jnp.int32(1)

  last = ((j == pl.num_programs(1) - 1) & (i == pl.num_programs(2) - 1) & (stage == 1)
          & (k == pl.num_programs(4) - 1))

  @pl.when(last & (pending_ref[0] != 0))
  def _finish():
    write.wait()
    pending_ref[0] = jnp.int32(0)
