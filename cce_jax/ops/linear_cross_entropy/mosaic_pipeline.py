"""The warp-specialised logit-tile pipeline shared by the Mosaic GPU (Hopper) kernels.

A CTA owns `BN` = 128 tokens and a range of the vocabulary, and runs three warpgroups:
- warpgroup 2 (the producer, 40 registers per thread) streams [128, bd] chunks of e and [256, bd] chunks of c
  into a ring of `stages` shared-memory slots by TMA, waiting on an "empty" barrier before reusing a slot;
- warpgroups 0 and 1 (the consumers, 232 registers) each take 128 of the 256 vocabulary rows of every chunk,
  accumulate their [128, 128] logit tile z with wgmma over D (fp32 in registers), release the slot, and hand z to
  the kernel's epilogue while the other consumer's wgmmas keep the tensor cores busy.
Out-of-bounds rows and columns of the last tiles are zero-filled by TMA; epilogues mask them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cce_jax.ops.linear_cross_entropy import manual_axes

BN = 128  # tokens per CTA tile (two wgmma M = 64 per consumer warpgroup)
BV = 128  # vocabulary entries per consumer tile
CTA_V = 2 * BV
MAX_SMEM_BYTES = 227 * 1024


def unsupported_reason(e_NxD, c_VxD, bias_V) -> str | None:
  """Why the Mosaic GPU kernels cannot run these inputs (None when they can): bf16 e and c, no bias, D a multiple
  of 16 (wgmma's K). N and V need not be multiples of 8 (TMA's tiled layout): see `pad_tokens`, `pad_vocabulary`."""
  if e_NxD.dtype != jnp.bfloat16 or c_VxD.dtype != jnp.bfloat16:
    return f"needs bf16 e and c, got {e_NxD.dtype} and {c_VxD.dtype}"
  if bias_V is not None:
    return "does not take a bias"
  d = e_NxD.shape[1]
  if d % 16:
    return f"needs D a multiple of 16, got D={d}"
  return None


def is_hopper() -> bool:
  """Whether the default device is an sm_90 GPU (wgmma; Blackwell's tensor cores need other instructions)."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def default_splits(n: int, v: int) -> int:
  """Vocabulary splits: about two CTAs per SM over the token tiles, at most 4 (H100: gemma2_2b 15.3 ms at 4
  splits vs 15.7 at 2 and 18.7 at 3; llama3_8b_4k 6.3 ms at 4 vs 10.4 at 2; H200: 6.2 at 4 vs 6.5-6.8 at 8,
  qwen_small 8.2 at 2 vs 8.2 at 4 and 8.9 at 8)."""
  sms = getattr(jax.devices()[0], "core_count", None) or 132
  return max(1, min(4, 2 * sms // pl.cdiv(n, BN), pl.cdiv(v, CTA_V)))


def pad_tokens(e_NxD, targets_N):
  """(e [N8, D], targets [N8]) with N8 = N rounded up to a multiple of 8 (TMA's tiled layout): zero rows, a copy
  of at most 7 rows."""
  n = e_NxD.shape[0]
  pad = pl.cdiv(n, 8) * 8 - n
  if not pad:
    return e_NxD, targets_N
  return jnp.pad(e_NxD, ((0, pad), (0, 0))), jnp.pad(targets_N, (0, pad))


def pad_vocabulary(c_VxD):
  """c [V8, D] with V8 = V rounded up to a multiple of 8 (TMA's tiled layout): zero rows, which the kernels mask
  as columns >= V. Costs a copy of c when V % 8 != 0 (GPT-2's 50257 × 768: 77 MB), small next to the V × N × D
  GEMM that reads it."""
  pad = -c_VxD.shape[0] % 8
  return jnp.pad(c_VxD, ((0, pad), (0, 0))) if pad else c_VxD


def block_d(d: int) -> int:
  """The D chunk per pipeline step (64 bf16 = one 128-byte swizzle row; smaller for D not a multiple of 64)."""
  return next(bd for bd in (64, 32, 16) if d % bd == 0)


def num_stages(bd: int, other_smem_bytes: int) -> int:
  """Ring slots that fit next to the epilogue's shared memory (at most 8)."""
  per_stage = (BN + CTA_V) * bd * 2
  return max(2, min(8, (MAX_SMEM_BYTES - other_smem_bytes - 8192) // per_stage, 196608 // per_stage))


def split_vocabulary(v: int, splits: int) -> tuple[int, int]:
  """(vocabulary entries per split, a multiple of 256; the number of non-empty splits)."""
  v_per_split = pl.cdiv(pl.cdiv(v, splits), CTA_V) * CTA_V
  return v_per_split, pl.cdiv(v, v_per_split)


def launch(kernel, out_type, *, n, splits, approx_math, interpret):
  """`kernel` over the grid (token tiles of N, vocabulary splits) with three warpgroups per CTA.

  Inside shard_map the outputs vary over the mesh axes of the first argument. (`plgpu.kernel` types them as
  invariant, as it traces with check_vma off; a consumer's implicit cast to varying would then transpose to a sum
  over the mesh. These kernels run only inside custom_vjp rules, where the cast here is not differentiated.)"""
  def call(*args):
    outs = plgpu.kernel(
        kernel,
        out_type=manual_axes.kernel_out(out_type, args[0]),
        grid=(pl.cdiv(n, BN), splits),
        grid_names=("tok", "split"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=approx_math),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(*args)
    return manual_axes.vary(outs, manual_axes.axes(args[0]))

  return call


def cta_range(v, v_per_split):
  """(first token, first vocabulary entry, CTA tiles of 256 entries) of this CTA."""
  v_lo = lax.axis_index("split") * v_per_split
  return lax.axis_index("tok") * BN, v_lo, lax.div(jnp.minimum(v - v_lo, v_per_split) + CTA_V - 1, CTA_V)


def row_layout(x):
  """A [BN] fp32 register array in the accumulator's row layout."""
  return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def logit_tiles(e_ref, c_ref, *, n0, v_lo, num_tiles, d, stages, scratch_types, consumer):
  """Runs the pipeline over `num_tiles` CTA tiles of 256 vocabulary rows from v_lo, tokens [n0, n0 + 128).

  consumer(wg, for_each_tile, *scratch) runs in both consumer warpgroups (wg = 0, 1) with the shared-memory
  scratch allocated from `scratch_types`; for_each_tile(body, init) folds body(t, v_start, z, carry) over this
  warpgroup's tiles: v_start = v_lo + 256 t + 128 wg is the first vocabulary row of z [128, 128] fp32.
  """
  bd = block_d(d)
  n_d = d // bd
  swizzle = plgpu.find_swizzle(bd * 16)
  transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
  steps = num_tiles * n_d

  def scoped(e_smem, c_smem, full, empty, *scratch):
    wg = lax.axis_index("wg")

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")

      def for_each_tile(body, init):
        def tile_body(t, carry):
          g0 = t * n_d

          def mma(acc_ref):
            def k_body(kd, _):
              g = g0 + kd
              slot = lax.rem(g, stages)
              plgpu.barrier_wait(full.at[slot])
              plgpu.wgmma(acc_ref, e_smem.at[slot], c_smem.at[slot].at[pl.ds(wg * BV, BV)].transpose((1, 0)))
              plgpu.wgmma_wait(1)  # the previous chunk's wgmma is done: release its slot

              @pl.when(kd > 0)
              def _():
                plgpu.barrier_arrive(empty.at[lax.rem(g - 1, stages)])

            lax.fori_loop(0, n_d, k_body, None)
            z = acc_ref[...]  # waits for the last wgmma group
            plgpu.barrier_arrive(empty.at[lax.rem(g0 + n_d - 1, stages)])
            return z

          z = pl.run_scoped(mma, plgpu.ACC((BN, BV), jnp.float32))
          return body(t, v_lo + t * CTA_V + wg * BV, z, carry)

        return lax.fori_loop(0, num_tiles, tile_body, init)

      consumer(wg, for_each_tile, *scratch)

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

        plgpu.copy_gmem_to_smem(e_ref.at[pl.ds(n0, BN), pl.ds(kd * bd, bd)], e_smem.at[slot], full.at[slot])
        for w in (0, 1):
          plgpu.copy_gmem_to_smem(c_ref.at[pl.ds(v_lo + t * CTA_V + w * BV, BV), pl.ds(kd * bd, bd)],
                                  c_smem.at[slot].at[pl.ds(w * BV, BV)], full.at[slot])

      lax.fori_loop(0, steps, step, None)

      def drain(g, _):  # the consumers' last releases: no barrier is left mid-phase at exit
        plgpu.barrier_wait(empty.at[lax.rem(g, stages)])

      lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, None)

  pl.run_scoped(
      scoped,
      plgpu.SMEM((stages, BN, bd), e_ref.dtype, transforms=transforms),
      plgpu.SMEM((stages, CTA_V, bd), c_ref.dtype, transforms=transforms),
      plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # full: the e copy and two c copies
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # empty: both consumers
      *scratch_types,
      collective_axes="wg",
  )
