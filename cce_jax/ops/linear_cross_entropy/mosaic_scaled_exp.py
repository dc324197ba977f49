"""The gradient-forming forward's Mosaic GPU (Hopper) kernel: each logit's exp(s - ref)·ds/dz in bf16, and the
per-row sums from which the LSE follows.

With a per-row reference `ref` fixed before the kernel runs (the softcap's bound, or an estimate of the row's LSE),
exp(s - ref) needs no running maximum, and d(logits) of a reduced cross-entropy is

  dZ[n, v] = r[n]·X[n, v] for v != t_n,   X = exp(s - ref)·ds/dz,
  r[n] = g_lse[n]·exp(ref[n] - lse[n]),     lse = ref + log(sum_v exp(s - ref)),

so X, written once by this kernel next to the sums, is all of dZ up to a per-row factor that is known once the
kernel's sums are merged: dE = r ⊙ (X @ c) and dC = Xᵀ @ (r ⊙ e), plus the target terms (`forward_gradient`).
X is stored in bf16, whose exponent range is fp32's: every entry keeps 8 significant bits whatever its size (bf16
logits, as a materialised loss stores them, lose up to |s|·2⁻⁹ absolutely).

The pipeline is `mosaic_pipeline`'s (a CTA owns 128 tokens and one vocabulary split); the epilogue of each
[128, 128] tile computes exp2, the sums and the tile of X, which a TMA store writes from shared memory while the
next tile's wgmmas run. Rows whose `live` is 0 (ignored tokens, padding) get X = 0, also where their logits are
NaN. Columns >= V of the last tile get X = 0 and are not part of the sums. The target's column gets X = 0 (it
is part of the sums): the caller forms its term, p_t - 1 for the mean loss, in fp32. Input conditions:
`mosaic_pipeline.unsupported_reason`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cce_jax.ops.linear_cross_entropy import mosaic_pipeline as mp

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# The per-row inputs (reference, live) travel as [8, 128] TMA boxes, as in `mosaic_dlogits` (a [2, 128] box
# stalled the GPU interpreter).
_ROWS = 8
_STATS = 3  # per sub-split: sum of exp(s - ref), target logit, logit sum


def scaled_exp(e_NxD, c_VxD, targets_N, ref_N, live_N, *, softcap, with_sum, splits, approx_math=True,
               interpret=False):
  """X and the partial sums of the logits s = softcap·tanh(z / softcap) (or z), z = e @ c.T.

  Args:
    e_NxD: [N, D] bf16. c_VxD: [V, D] bf16. targets_N: [N] int (outside [0, V): target logit 0).
    ref_N: [N] fp32, finite: the reference (s - ref must stay below ~80 for exp to stay finite in fp32).
    live_N: [N] bool: rows whose X is written (X = 0 elsewhere).
    splits: vocabulary splits (CTAs per token tile; two sub-splits each).

  Returns:
    x [N, V'] bf16 with V' = V rounded up to a multiple of 128 (0 in columns >= V and in each row's target
    column, whose term the caller forms in fp32), and (l, target, sum) each
    [2 × splits', N] fp32 over each sub-split's columns: sum of exp(s - ref), the target logit, the logit sum (0
    unless with_sum).
  """
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  e_NxD, targets_N = mp.pad_tokens(e_NxD, targets_N)
  c_VxD = mp.pad_vocabulary(c_VxD)  # the kernel masks columns >= v
  n8 = e_NxD.shape[0]
  rows = jnp.stack([ref_N.astype(jnp.float32), live_N.astype(jnp.float32)])
  rows = jnp.pad(rows, ((0, _ROWS - 2), (0, n8 - n)))  # live = 0 on the padding
  v_out = pl.cdiv(v, mp.BV) * mp.BV
  v_per_split, splits = mp.split_vocabulary(v, splits)
  stages = mp.num_stages(mp.block_d(d), 2 * mp.BN * mp.BV * 2 + 2 * (2 + _STATS) * mp.BN * 4 + 1024)
  n_pad = pl.cdiv(n8, mp.BN) * mp.BN  # the sums are stored as whole [128] rows
  kernel = functools.partial(_kernel, d=d, v=v, stages=stages, v_per_split=v_per_split, softcap=softcap,
                             with_sum=with_sum)
  part = jax.ShapeDtypeStruct((2 * splits, n_pad), jnp.float32)
  out_type = (jax.ShapeDtypeStruct((n8, v_out), e_NxD.dtype), part, part, part)
  x, *sums = mp.launch(kernel, out_type, n=n8, splits=splits, approx_math=approx_math, interpret=interpret)(
      e_NxD, c_VxD, targets_N.astype(jnp.int32), rows)
  return (x if n8 == n else x[:n]), tuple(s[:, :n] for s in sums)


def reference(e_NxD, c_VxD, targets_N, ref_N, live_N, *, softcap, with_sum, splits):
  """`scaled_exp` in plain jnp (fp32 arithmetic, X rounded to bf16; every sum in one split): the kernel's test
  oracle, and what `forward_gradient` runs in interpret mode (the GPU interpreter runs the kernel eagerly, but
  stalls on it inside a jitted program)."""
  del splits
  n, v = e_NxD.shape[0], c_VxD.shape[0]
  v_out = pl.cdiv(v, mp.BV) * mp.BV
  z = jnp.dot(e_NxD, c_VxD.T, preferred_element_type=jnp.float32)
  s = z if softcap is None else softcap * jnp.tanh(z / softcap)
  p = jnp.exp(s - ref_N[:, None].astype(jnp.float32))
  cols = jnp.arange(v)[None, :]
  tgt = targets_N[:, None].astype(jnp.int32)
  x = p if softcap is None else p * (1.0 - jnp.square(s / softcap))
  x = jnp.where(live_N[:, None] & (cols != tgt), x, 0.0)
  x = jnp.pad(x, ((0, 0), (0, v_out - v))).astype(e_NxD.dtype)
  sums = (jnp.sum(p, axis=1), jnp.sum(jnp.where(cols == tgt, s, 0.0), axis=1),
          jnp.sum(s, axis=1) if with_sum else jnp.zeros((n,), jnp.float32))
  return x, tuple(t[None, :] for t in sums)


def _kernel(e_ref, c_ref, t_ref, rows_ref, x_ref, l_ref, st_ref, sum_ref, *, d, v, stages, v_per_split, softcap,
            with_sum):
  n0, v_lo, num_tiles = mp.cta_range(v, v_per_split)
  j = lax.axis_index("split")
  swizzle = plgpu.find_swizzle(mp.BV * 16)
  out_transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
  stat_refs = (l_ref, st_ref, sum_ref)

  def consumer(wg, for_each_tile, t_smem, rows_smem, x_smem, stat_smem, bar):
    plgpu.copy_gmem_to_smem(t_ref.at[pl.ds(n0, mp.BN)], t_smem.at[wg], bar.at[wg])
    plgpu.copy_gmem_to_smem(rows_ref.at[:, pl.ds(n0, mp.BN)], rows_smem.at[wg], bar.at[wg])
    plgpu.barrier_wait(bar.at[wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    tgt = plgpu.load(t_smem.at[wg], layout=row_layout)
    ref2 = plgpu.load(rows_smem.at[wg, 0], layout=row_layout) * _LOG2E
    live = plgpu.load(rows_smem.at[wg, 1], layout=row_layout)
    shape = (mp.BN, mp.BV)
    bcast = lambda r: lax.broadcast_in_dim(r, shape, [0])

    def body(t, v_start, z, carry):
      l, st, ssum = carry
      cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + v_start
      ok = cols < v
      if softcap is not None:
        th = jnp.tanh(z * (1.0 / softcap))
        s2 = th * (softcap * _LOG2E)  # the logit in log2 units
      else:
        s2 = z * _LOG2E
      p = jnp.where(ok, jnp.exp2(s2 - bcast(ref2)), 0.0)
      l = l + p.sum(axis=1)
      st = st + jnp.where(cols == bcast(tgt), s2, 0.0).sum(axis=1)  # targets >= v match no column
      if with_sum:
        ssum = ssum + jnp.where(ok, s2, 0.0).sum(axis=1)
      x = p if softcap is None else p * (1.0 - th * th)
      # 0 for dead rows (also where their logits are NaN) and in the target's column
      x = jnp.where((bcast(live) > 0.0) & (cols != bcast(tgt)), x, 0.0)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read x_smem
      x_smem.at[wg][...] = x.astype(x_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(x_smem.at[wg], x_ref.at[pl.ds(n0, mp.BN), pl.ds(v_start, mp.BV)])
      return l, st, ssum

    zero = mp.row_layout(jnp.zeros((mp.BN,), jnp.float32))
    sums = for_each_tile(body, (zero, zero, zero))
    for k, val in enumerate((sums[0], sums[1] * _LN2, sums[2] * _LN2)):  # log2 -> natural units
      stat_smem.at[wg, k][...] = val
    plgpu.commit_smem()
    for k in range(_STATS):
      plgpu.copy_smem_to_gmem(stat_smem.at[wg, k], stat_refs[k].at[j * 2 + wg, pl.ds(n0, mp.BN)])
    plgpu.wait_smem_to_gmem(0)

  mp.logit_tiles(
      e_ref, c_ref, n0=n0, v_lo=v_lo, num_tiles=num_tiles, d=d, stages=stages, consumer=consumer,
      scratch_types=(plgpu.SMEM((2, mp.BN), jnp.int32), plgpu.SMEM((2, _ROWS, mp.BN), jnp.float32),
                     plgpu.SMEM((2, mp.BN, mp.BV), e_ref.dtype, transforms=out_transforms),
                     plgpu.SMEM((2, _STATS, mp.BN), jnp.float32),
                     plgpu.Barrier(num_arrivals=2, num_barriers=2)))
