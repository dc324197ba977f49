"""The forward statistics as a Pallas Mosaic GPU kernel for Hopper (sm_90: wgmma tensor-core ops, TMA copies).

Same outputs as the Triton forward of `pallas_gpu` (per split: running max m, sum l, target logit, logit sum and
softmax-weighted logit sum; optionally each row's largest logit per 128-wide vocabulary tile), merged there.

A CTA owns `_BN` = 128 tokens and one split of the vocabulary, and runs three warpgroups:
- warpgroup 2 (the producer, 40 registers per thread) streams [128, bd] chunks of e and [256, bd] chunks of c
  into a ring of `stages` shared-memory slots by TMA, waiting on an "empty" barrier before reusing a slot;
- warpgroups 0 and 1 (the consumers, 232 registers) each take 128 of the 256 vocabulary rows of every chunk,
  accumulate their [128, 128] logit tile with wgmma over D (fp32 in registers) and release the slot, then fold
  the tile into their own online log-sum-exp (in log2 units, so exp2 is one instruction). Each consumer writes
  its statistics as its own sub-split row, so the [2 × splits, N] partial outputs merge like the Triton ones.
With `approx_math` the epilogue's exp2 and tanh use the GPU's approximate instructions (ex2.approx,
tanh.approx; loss error ~1e-6 relative, far below bf16 rounding of the inputs).

Requirements (else `pallas_gpu` runs its Triton forward, see `unsupported_reason`): bf16 e and c, no bias,
D a multiple of 16, V a multiple of 8 (TMA's tiled layout; N is padded to a multiple of 8 here, a copy of at most
7 rows). Out-of-bounds rows and columns of the last tiles are zero-filled by TMA and masked.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_BN = 128  # tokens per CTA tile (one wgmma M of 64 × 2 per consumer warpgroup)
_BV = ROW_MAX_BLOCK_V = 128  # vocabulary rows per consumer tile (the row-maxima tile)
_SMEM_RING_BYTES = 196608  # operand ring budget: 4 stages of 128 × 64 (e) + 256 × 64 (c) bf16
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def unsupported_reason(e_ND, c_VD, bias_V, row_max_block_v=None) -> str | None:
  """Why the Mosaic forward cannot run these inputs (None when it can)."""
  if e_ND.dtype != jnp.bfloat16 or c_VD.dtype != jnp.bfloat16:
    return f"needs bf16 e and c, got {e_ND.dtype} and {c_VD.dtype}"
  if bias_V is not None:
    return "does not take a bias"
  d, v = e_ND.shape[1], c_VD.shape[0]
  if d % 16:
    return f"needs D a multiple of 16, got D={d}"
  if v % 8:
    return f"needs V a multiple of 8, got V={v}"
  if row_max_block_v is not None and row_max_block_v % ROW_MAX_BLOCK_V:
    return f"writes row maxima per {_BV} vocabulary entries; block_v={row_max_block_v} is not a multiple"
  return None


def is_hopper() -> bool:
  """Whether the default device is an sm_90 GPU (wgmma; Blackwell's tensor cores need other instructions)."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def default_splits(n: int, v: int) -> int:
  """Vocabulary splits: about two CTAs per SM over the token tiles, at most 4 (H100: gemma2_2b 15.3 ms at 4
  splits vs 15.7 at 2 and 18.7 at 3; llama3_8b_4k 6.3 ms at 4 vs 10.4 at 2; H200: 6.2 at 4 vs 6.5-6.8 at 8,
  qwen_small 8.2 at 2 vs 8.2 at 4 and 8.9 at 8)."""
  dev = jax.devices()[0]
  sms = getattr(dev, "core_count", None) or 132
  n_tiles = -(-n // _BN)
  return max(1, min(4, 2 * sms // n_tiles, -(-v // (2 * _BV))))


def _block_d(d):
  return next(bd for bd in (64, 32, 16) if d % bd == 0)


def forward_partials(e_ND, c_VD, targets_N, *, softcap, inv_temperature, with_sum, with_mean, with_row_max,
                     splits, approx_math=True, interpret=False):
  """Per-split statistics of the logits s = softcap·tanh(z / softcap) · inv_temperature, z = e @ c.T.

  Args:
    e_ND: [N, D] bf16. c_VD: [V, D] bf16. targets_N: [N] int (out of range: target logit 0).
    splits: vocabulary splits (CTAs per token tile: 2 sub-splits each).

  Returns:
    (m, l, target, sum, weighted) each [2 × splits', N] fp32 in natural-log units: running max, sum of
    exp(s - m), target logit, logit sum (0 unless with_sum), sum of exp(s - m)·s (0 unless with_mean); and
    the row maxima [N, V tiles of 128] fp32 (None unless with_row_max).
  """
  n, d = e_ND.shape
  v = c_VD.shape[0]
  n8 = -(-n // 8) * 8
  if n8 != n:
    e_ND = jnp.pad(e_ND, ((0, n8 - n), (0, 0)))
    targets_N = jnp.pad(targets_N, (0, n8 - n))
  bd = _block_d(d)
  stages = max(2, min(8, _SMEM_RING_BYTES // (3 * _BN * bd * 2)))
  cta_v = 2 * _BV
  v_per_split = pl.cdiv(pl.cdiv(v, splits), cta_v) * cta_v
  splits = pl.cdiv(v, v_per_split)
  n_tiles = pl.cdiv(n8, _BN)
  n_pad = n_tiles * _BN  # TMA stores whole [128] rows
  kernel = functools.partial(
      _kernel, n_d=d // bd, bd=bd, stages=stages, v=v, v_per_split=v_per_split, softcap=softcap,
      inv_temperature=inv_temperature, with_sum=with_sum, with_mean=with_mean, with_row_max=with_row_max,
      dtype=e_ND.dtype)
  part = jax.ShapeDtypeStruct((2 * splits, n_pad), jnp.float32)
  out_type = [part] * 5
  if with_row_max:
    out_type.append(jax.ShapeDtypeStruct((pl.cdiv(v, _BV), n_pad), jnp.float32))
  outs = plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(n_tiles, splits),
      grid_names=("tok", "split"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=approx_math),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(e_ND, c_VD, targets_N.astype(jnp.int32))
  stats = tuple(o[:, :n] for o in outs[:5])
  return stats, (outs[5][:, :n].T if with_row_max else None)


def _kernel(e_ref, c_ref, t_ref, m_ref, l_ref, st_ref, sum_ref, w_ref, *rest, n_d, bd, stages, v, v_per_split,
            softcap, inv_temperature, with_sum, with_mean, with_row_max, dtype):
  rmax_ref = rest[0] if with_row_max else None
  stat_refs = (m_ref, l_ref, st_ref, sum_ref, w_ref)
  cta_v = 2 * _BV
  swizzle = plgpu.find_swizzle(bd * 16)
  transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))

  def scoped(e_smem, c_smem, t_smem, out_smem, rmax_smem, full, empty, tbar):
    i = lax.axis_index("tok")
    j = lax.axis_index("split")
    wg = lax.axis_index("wg")
    n0 = i * _BN
    v_lo = j * v_per_split
    num_tiles = lax.div(jnp.minimum(v - v_lo, v_per_split) + cta_v - 1, cta_v)
    steps = num_tiles * n_d

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      plgpu.copy_gmem_to_smem(t_ref.at[pl.ds(n0, _BN)], t_smem.at[wg], tbar.at[wg])
      plgpu.barrier_wait(tbar.at[wg])
      tgt = plgpu.load(t_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
      row = lambda x: plgpu.layout_cast(jnp.full((_BN,), x, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      init = (row(-jnp.inf), row(0.0), row(0.0), row(0.0), row(0.0))
      shape = (_BN, _BV)
      bcast = lambda r: lax.broadcast_in_dim(r, shape, [0])

      def tile_body(t, carry):
        g0 = t * n_d

        def mma(acc_ref):
          def k_body(kd, _):
            g = g0 + kd
            slot = lax.rem(g, stages)
            plgpu.barrier_wait(full.at[slot])
            plgpu.wgmma(acc_ref, e_smem.at[slot], c_smem.at[slot].at[pl.ds(wg * _BV, _BV)].transpose((1, 0)))
            plgpu.wgmma_wait(1)  # the previous chunk's wgmma is done: release its slot

            @pl.when(kd > 0)
            def _():
              plgpu.barrier_arrive(empty.at[lax.rem(g - 1, stages)])

          lax.fori_loop(0, n_d, k_body, None)
          z = acc_ref[...]  # waits for the last wgmma group
          plgpu.barrier_arrive(empty.at[lax.rem(g0 + n_d - 1, stages)])
          return z

        z = pl.run_scoped(mma, plgpu.ACC(shape, jnp.float32))
        v_start = v_lo + t * cta_v + wg * _BV
        m, l, st, ssum, w = carry
        if softcap is not None:
          s = jnp.tanh(z * (1.0 / softcap)) * (softcap * inv_temperature * _LOG2E)  # log2 units
        else:
          s = z * (inv_temperature * _LOG2E)
        cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + v_start
        ok = cols < v
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
        if with_row_max:  # double-buffered TMA store of this tile's row maxima
          rslot = lax.rem(t, 2)
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that last used rslot has read it
          rmax_smem.at[wg, rslot][...] = tile_max * _LN2
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(rmax_smem.at[wg, rslot], rmax_ref.at[lax.div(v_start, _BV), pl.ds(n0, _BN)])
        return m_new, l, st, ssum, w

      m, l, st, ssum, w = lax.fori_loop(0, num_tiles, tile_body, init)
      for k, val in enumerate((m * _LN2, l, st * _LN2, ssum * _LN2, w * _LN2)):
        out_smem.at[wg, k][...] = val
      plgpu.commit_smem()
      for k in range(5):
        plgpu.copy_smem_to_gmem(out_smem.at[wg, k], stat_refs[k].at[j * 2 + wg, pl.ds(n0, _BN)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def step(g, _):
        slot = lax.rem(g, stages)
        kd = lax.rem(g, n_d)
        t = lax.div(g, n_d)

        @pl.when(g >= stages)
        def _():
          plgpu.barrier_wait(empty.at[slot])

        plgpu.copy_gmem_to_smem(e_ref.at[pl.ds(n0, _BN), pl.ds(kd * bd, bd)], e_smem.at[slot], full.at[slot])
        for w in (0, 1):
          plgpu.copy_gmem_to_smem(c_ref.at[pl.ds(v_lo + t * cta_v + w * _BV, _BV), pl.ds(kd * bd, bd)],
                                  c_smem.at[slot].at[pl.ds(w * _BV, _BV)], full.at[slot])

      lax.fori_loop(0, steps, step, None)

      def drain(g, _):  # the consumers' last releases: no barrier is left mid-phase at exit
        plgpu.barrier_wait(empty.at[lax.rem(g, stages)])

      lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, None)

  pl.run_scoped(
      scoped,
      plgpu.SMEM((stages, _BN, bd), dtype, transforms=transforms),
      plgpu.SMEM((stages, cta_v, bd), dtype, transforms=transforms),
      plgpu.SMEM((2, _BN), jnp.int32),
      plgpu.SMEM((2, 5, _BN), jnp.float32),
      plgpu.SMEM((2, 2, _BN), jnp.float32),
      plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # full: the e copy and two c copies
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # empty: both consumers
      plgpu.Barrier(num_barriers=2),  # targets, one per consumer
      collective_axes="wg",
  )
