"""The forward statistics as a Pallas Mosaic GPU kernel for Hopper (sm_90: wgmma tensor-core ops, TMA copies).

Same outputs as the Triton forward of `pallas_gpu` (per split: running max m, sum l, target logit, logit sum and
softmax-weighted logit sum; optionally each row's largest logit per 128-wide vocabulary tile, or a 2-bit code of
it per row and tile, relative to a per-row reference and the filter threshold), merged there.

A CTA owns 128 tokens and one split of the vocabulary (grid: token tiles × splits) and runs the pipeline of
`mosaic_pipeline`: a TMA producer warpgroup and two wgmma consumer warpgroups, each folding its [128, 128] logit
tiles into its own online log-sum-exp (in log2 units, so exp2 is one instruction). With a softcap (logits within
±b, b = softcap / temperature ≤ FIXED_REFERENCE_MAX) the sums take b as a fixed reference instead of a running
maximum: no row-max reduction ahead of each tile's exp2, no rescaling. Each consumer writes its statistics as its
own sub-split row, so the [2 × splits, N] partial outputs merge like the Triton ones.
With `approx_math` the epilogue's exp2 and tanh use the GPU's approximate instructions (ex2.approx,
tanh.approx; loss error ~1e-6 relative, far below bf16 rounding of the inputs).

Requirements (else `pallas_gpu` runs its Triton forward): those of `mosaic_pipeline.unsupported_reason`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cce_jax.ops.linear_cross_entropy import kernel_refs
from cce_jax.ops.linear_cross_entropy import mosaic_pipeline as mp

_BN = mp.BN
_BV = ROW_MAX_BLOCK_V = mp.BV  # the row maxima are per consumer tile
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Softcapped logits lie in [-b, b], b = softcap / temperature; for b up to this many nats, exp(s - b) stays within
# fp32's normal range (e^-80 > 2^-126), so the sums use b as a fixed reference instead of a running maximum.
FIXED_REFERENCE_MAX = 40.0
# Row codes: d = row max - reference - log(filter_eps) (nats) is coded 0 below CODE_LEVELS[0], 1 below
# CODE_LEVELS[1], 2 below CODE_LEVELS[2], else 3; CODE_UPPER[code] bounds d from above. The reference is an
# estimate of the row's LSE a little below it (`lse_estimate`), so lse - ref mostly lies in [0, 0.5): the levels
# are fine there.
CODE_LEVELS = (-0.1, 0.1, 0.5)
CODE_UPPER = CODE_LEVELS + (float("inf"),)


def unsupported_reason(e_NxD, c_VxD, bias_V, row_max_block_v=None) -> str | None:
  """Why this forward cannot run these inputs (None when it can): the pipeline's conditions, and row maxima per
  `row_max_block_v` entries (when given) must be whole 128-wide tiles."""
  reason = mp.unsupported_reason(e_NxD, c_VxD, bias_V)
  if reason is None and row_max_block_v is not None and row_max_block_v % ROW_MAX_BLOCK_V:
    return f"writes row maxima per {_BV} vocabulary entries; block_v={row_max_block_v} is not a multiple"
  return reason


def forward_partials(e_NxD, c_VxD, targets_N, *, softcap, inv_temperature, with_sum, with_mean, with_row_max,
                     splits, reference_N=None, filter_eps=None, approx_math=True, interpret=False):
  """Per-split statistics of the logits s = softcap·tanh(z / softcap) · inv_temperature, z = e @ c.T.

  Args:
    e_NxD: [N, D] bf16. c_VxD: [V, D] bf16. targets_N: [N] int (out of range: target logit 0).
    splits: vocabulary splits (CTAs per token tile: 2 sub-splits each).
    reference_N: [N] fp32 or None: with it (and filter_eps), the kernel also writes each row's code per
      128-wide tile (`CODE_LEVELS`) of d = max over the tile's columns of s, less reference_N, less
      log(filter_eps); rows with reference +inf code 0.

  Returns:
    (m, l, target, sum, weighted) each [2 × splits', N] fp32 in natural-log units: running max, sum of
    exp(s - m), target logit, logit sum (0 unless with_sum), sum of exp(s - m)·s (0 unless with_mean); and
    the row maxima [N, V tiles of 128] fp32 (with_row_max), or (codes, T) with reference_N: codes [splits', 2,
    G, N] int8 hold 2 bits per row and tile, the t-th tile of consumer w of split j (tiles 128 (2 (j T + t) + w)
    on) in group t // 4 at bit 2 (t % 4) (`decode_codes`), or None.
  """
  with_codes = reference_N is not None
  if with_row_max and with_codes:
    raise ValueError("forward_partials: with_row_max and reference_N exclude each other")
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  e_NxD, targets_N = mp.pad_tokens(e_NxD, targets_N)
  c_VxD = mp.pad_vocabulary(c_VxD)  # the kernel masks columns >= v
  n8 = e_NxD.shape[0]
  v_per_split, splits = mp.split_vocabulary(v, splits)
  per_consumer = v_per_split // mp.CTA_V  # tiles per consumer; their codes go 4 to a byte
  groups = pl.cdiv(per_consumer, 4)
  stages = mp.num_stages(mp.block_d(d), 8192 + (3 * _BN * 4 if with_codes else 0))
  if not (with_row_max or with_codes):
    # The plain forward runs faster on a 3-slot ring (H200, alternating rounds: gemma2_2b 14.81 vs 15.19 ms,
    # qwen_small 8.44 vs 8.61, llama3_8b_4k 6.35 vs 6.28); with row maxima the 4th slot was as fast or faster.
    stages = min(stages, 3)
  n_tiles = pl.cdiv(n8, _BN)
  n_pad = n_tiles * _BN  # TMA stores whole [128] rows
  kernel = functools.partial(
      _kernel, d=d, stages=stages, v=v, v_per_split=v_per_split, softcap=softcap,
      inv_temperature=inv_temperature, with_sum=with_sum, with_mean=with_mean, with_row_max=with_row_max,
      code_groups=groups if with_codes else 0, log_eps=math.log(filter_eps) if with_codes else None)
  part = jax.ShapeDtypeStruct((2 * splits, n_pad), jnp.float32)
  out_type = [part] * 5
  if with_row_max:
    out_type.append(jax.ShapeDtypeStruct((pl.cdiv(v, _BV), n_pad), jnp.float32))
  if with_codes:  # [(split, consumer, group), N], 2 bits per tile (see Returns)
    out_type.append(jax.ShapeDtypeStruct((splits * 2 * groups, n_pad), jnp.int8))
  args = [e_NxD, c_VxD, targets_N.astype(jnp.int32)]
  if with_codes:  # whole tiles of +inf past N: no out-of-bounds rows (TMA would fill them with 0)
    args.append(jnp.pad(reference_N.astype(jnp.float32), (0, n_pad - n), constant_values=jnp.inf))
  outs = mp.launch(kernel, out_type, n=n8, splits=splits, approx_math=approx_math, interpret=interpret)(*args)
  stats = tuple(o[:, :n] for o in outs[:5])
  if with_codes:
    return stats, (outs[5].reshape(splits, 2, groups, n_pad)[..., :n], per_consumer)
  return stats, (outs[5][:, :n].T if with_row_max else None)


def decode_codes(packed):
  """The codes [splits, 2, G, 4, N] int32 (0..3) of packed [splits, 2, G, N] int8 (elementwise: XLA fuses it
  into what reduces it)."""
  b = packed.astype(jnp.int32)[:, :, :, None, :] & 255
  return (b >> (2 * jnp.arange(4, dtype=jnp.int32))[:, None]) & 3


def _kernel(*refs, d, stages, v, v_per_split, softcap, inv_temperature, with_sum, with_mean, with_row_max,
            code_groups, log_eps):
  e_ref, c_ref, t_ref, ref_ref, m_ref, l_ref, st_ref, sum_ref, w_ref, rmax_ref, code_ref = kernel_refs.unpack(
      refs, e=True, c=True, targets=True, reference=bool(code_groups), m=True, l=True, target=True, sum=True,
      weighted=True, row_max=with_row_max, codes=bool(code_groups))
  fixed_ref = softcap is not None and softcap * inv_temperature <= FIXED_REFERENCE_MAX
  bound2 = softcap * inv_temperature * _LOG2E if fixed_ref else None  # the logits' bound, log2 units
  stat_refs = (m_ref, l_ref, st_ref, sum_ref, w_ref)
  n0, v_lo, num_tiles = mp.cta_range(v, v_per_split)
  j = lax.axis_index("split")

  def consumer(wg, for_each_tile, t_smem, out_smem, rmax_smem, tbar, *code_scratch):
    plgpu.copy_gmem_to_smem(t_ref.at[pl.ds(n0, _BN)], t_smem.at[wg], tbar.at[wg])
    if code_ref is not None:
      code_smem, ref_smem, rbar = code_scratch
      plgpu.copy_gmem_to_smem(ref_ref.at[pl.ds(n0, _BN)], ref_smem.at[wg], rbar.at[wg])
      plgpu.barrier_wait(rbar.at[wg])
    plgpu.barrier_wait(tbar.at[wg])
    tgt = plgpu.load(t_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
    if code_ref is not None:
      # d in log2 units: the tile's row maxima less this offset
      offset2 = (plgpu.load(ref_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) + log_eps) * _LOG2E
    row = lambda x: mp.row_layout(jnp.full((_BN,), x, jnp.float32))
    shape = (_BN, _BV)
    bcast = lambda r: lax.broadcast_in_dim(r, shape, [0])

    def body(t, v_start, z, carry):
      m, l, st, ssum, w = carry[:5]
      cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + v_start
      ok = cols < v
      if fixed_ref:  # u = s / bound in [-1, 1]; p = exp2(s - bound) needs no running max
        u = jnp.tanh(z * (1.0 / softcap))
        p = jnp.where(ok, jnp.exp2(u * bound2 - bound2), 0.0)
        l = l + p.sum(axis=1)
        st = st + jnp.where(cols == bcast(tgt), u, 0.0).sum(axis=1)  # targets are < v
        if with_sum:
          ssum = ssum + jnp.where(ok, u, 0.0).sum(axis=1)
        if with_mean:
          w = w + (p * u).sum(axis=1)
        maxima = rmax_ref is not None or code_ref is not None
        tile_max = jnp.where(ok, u, -jnp.inf).max(axis=1) * bound2 if maxima else None
      else:
        if softcap is not None:
          s = jnp.tanh(z * (1.0 / softcap)) * (softcap * inv_temperature * _LOG2E)  # log2 units
        else:
          s = z * (inv_temperature * _LOG2E)
        s = jnp.where(ok, s, -jnp.inf)
        tile_max = s.max(axis=1)
        m_new = jnp.maximum(m, tile_max)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a sub-split with no valid column yet
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - bcast(m_use))
        l = l * alpha + p.sum(axis=1)
        s0 = jnp.where(ok, s, 0.0)
        st = st + jnp.where(cols == bcast(tgt), s0, 0.0).sum(axis=1)
        if with_sum:
          ssum = ssum + s0.sum(axis=1)
        if with_mean:
          w = w * alpha + (p * s0).sum(axis=1)
        m = m_new
      if with_row_max:  # double-buffered TMA store of this tile's row maxima
        rslot = lax.rem(t, 2)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that last used rslot has read it
        rmax_smem.at[wg, rslot][...] = tile_max * _LN2
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(rmax_smem.at[wg, rslot], rmax_ref.at[lax.div(v_start, _BV), pl.ds(n0, _BN)])
      if code_ref is not None:  # this tile's 2-bit row codes into the packed byte of its group of 4
        d2 = tile_max - offset2
        code = sum(jnp.where(d2 >= level * _LOG2E, 1.0, 0.0) for level in CODE_LEVELS)
        q = lax.rem(t, 4)
        packed = carry[5] + code * lax.shift_left(jnp.int32(1), 2 * q).astype(jnp.float32)

        @pl.when((q == 3) | (t == num_tiles - 1))
        def _():
          g = lax.div(t, 4)
          slot = lax.rem(g, 2)
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that last used slot has read it
          code_smem.at[wg, slot][...] = packed.astype(jnp.int32).astype(jnp.int8)
          plgpu.commit_smem()
          dst = code_ref.at[(j * 2 + wg) * code_groups + g, pl.ds(n0, _BN)]
          plgpu.copy_smem_to_gmem(code_smem.at[wg, slot], dst)

        return m, l, st, ssum, w, packed * jnp.where(q == 3, 0.0, 1.0)
      return m, l, st, ssum, w

    init = (row(bound2 if fixed_ref else -jnp.inf), row(0.0), row(0.0), row(0.0), row(0.0))
    m, l, st, ssum, w = for_each_tile(body, init + ((row(0.0),) if code_ref is not None else ()))[:5]
    scale = bound2 * _LN2 if fixed_ref else _LN2  # u -> natural units, or log2 -> natural units
    for k, val in enumerate((m * _LN2, l, st * scale, ssum * scale, w * scale)):
      out_smem.at[wg, k][...] = val
    plgpu.commit_smem()
    for k in range(5):
      plgpu.copy_smem_to_gmem(out_smem.at[wg, k], stat_refs[k].at[j * 2 + wg, pl.ds(n0, _BN)])
    plgpu.wait_smem_to_gmem(0)

  mp.logit_tiles(
      e_ref, c_ref, n0=n0, v_lo=v_lo, num_tiles=num_tiles, d=d, stages=stages, consumer=consumer,
      scratch_types=(plgpu.SMEM((2, _BN), jnp.int32), plgpu.SMEM((2, 5, _BN), jnp.float32),
                     plgpu.SMEM((2, 2, _BN), jnp.float32), plgpu.Barrier(num_barriers=2))
      + ((plgpu.SMEM((2, 2, _BN), jnp.int8), plgpu.SMEM((2, _BN), jnp.float32),
          plgpu.Barrier(num_barriers=2)) if code_groups else ()))
