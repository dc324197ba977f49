"""The "pallas_tpu" kernels' expected time on a TPU from their block schedule: a roofline, not a measurement.

Each kernel takes at least the larger of its MXU time (its GEMM FLOPs at the generation's peak bf16 rate) and its
HBM time (the bytes its grid moves, at peak bandwidth). The bytes follow the grid: the forward reads every e
block once per vocabulary block and every c block once per token block; each gradient kernel reads them in both
of its stages (once when D is a single block: the block index does not change between the stages) and writes
its fp32 row blocks once. Elementwise work (exp, softcap) and the pipeline's bubbles are left out, so real times
are longer; the model says which resource bounds a shape and how far a schedule is from the three-GEMM floor.

The two backwards (`PallasTpuConfig.backward`). "split" (`tpu_backward`): two kernels of two GEMMs each, each
reading e and c (twice when D spans several blocks). "fused" (`tpu_fused_backward`): one kernel of three GEMMs
and one such pass over e and c, plus the read-modify-write of dE's fp32 tiles, 8 bytes per dE entry per
vocabulary block (8 · N · D · V / grad_block_v; on v4 and v5p also the sum of the two cores' dE partials). It
saves a GEMM and a pass over the inputs for that traffic, and since only dC's row block stays in VMEM, its
vocabulary block can grow (to 2048) and D can be one block (one pass over e and c instead of two) within the
same VMEM: `for_shape` takes the fused tiles the model expects fastest. Forward + backward in milliseconds, bf16,
`for_shape`'s tiles, split / fused:

| shape (N, D, V) | v4 | v5e | v5p | v6e |
|---|---|---|---|---|
| gemma2_2b (8192, 2304, 256000) | 289.3 / 257.6 | 245.3 / 196.2 | 105.3 / 84.2 | 59.2 / 43.1 |
| llama3_8b_8k (8192, 4096, 128256) | 257.4 / 257.4 | 218.5 / 174.8 | 93.8 / 75.0 | 52.8 / 44.3 |
| qwen_small (16384, 1024, 151936) | 152.2 / 77.4 | 129.4 / 103.5 | 55.5 / 44.4 | 30.9 / 22.7 |

Where the MXU bounds (v5e, v5p) the fused backward is four GEMMs for five, 20% less time; where HBM does (v6e,
v4) it gains from the larger tiles (v6e then becomes MXU-bound at gemma2_2b and qwen_small); on v4 at
llama3_8b_8k (D 4096 in 16 MiB of VMEM: tiles of 256) the two tie. It is never slower at these shapes, so
it is the default; none of this is measured on a TPU.
"""

from __future__ import annotations

from typing import NamedTuple

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy.tpu_config import GENERATIONS
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig


class KernelTime(NamedTuple):
  """Seconds at the MXU peak, at the HBM peak, and the roofline bound (their max)."""

  mxu_s: float
  hbm_s: float

  @property
  def bound_s(self) -> float:
    return max(self.mxu_s, self.hbm_s)


def expected(config: PallasTpuConfig, n: int, v: int, d: int, *, itemsize: int = 2) -> dict[str, KernelTime]:
  """Roofline times of the kernels on config.generation for N tokens, V entries, hidden size D and inputs of
  `itemsize` bytes: "forward" and, for the split backward, "de" and "dc", for the fused one "bwd"."""
  gen = GENERATIONS[config.generation]
  t = config.tiles(n, v, d)
  gemm = 2.0 * n * v * d  # FLOPs of one N x V x D GEMM
  fwd_bytes = (base.cdiv(v, t.block_v) * n * d + base.cdiv(n, t.block_n) * v * d) * itemsize + 16 * n
  nj = base.cdiv(v, t.grad_block_v)
  stages = 1 if t.grad_block_d >= d else 2
  width = base.cdiv(d, t.grad_block_d) * t.grad_block_d
  inputs = stages * (nj * n * d + base.cdiv(n, t.grad_block_n) * v * d) * itemsize
  time = lambda flops, nbytes: KernelTime(flops / gen.mxu_flops, nbytes / gen.hbm_bytes_per_s)
  if config.backward == "fused":
    cores = min(gen.cores, nj)
    # dE's fp32 tiles: written by every vocabulary block, read back by all but each core's first; dC written
    # once; the cores' dE partials summed outside the kernel.
    rmw = 4 * n * width * (2 * nj - cores)
    reduce = (4 * cores + 4) * n * d if cores > 1 else 0
    bwd_bytes = inputs + rmw + 4 * v * width + 36 * n * nj + reduce
    return {"forward": time(gemm, fwd_bytes), "bwd": time(3 * gemm, bwd_bytes)}
  de_bytes = inputs + 4 * n * width + 36 * n
  dc_bytes = inputs + 4 * v * width + 36 * n * nj
  return {"forward": time(gemm, fwd_bytes), "de": time(2 * gemm, de_bytes), "dc": time(2 * gemm, dc_bytes)}


def loss_and_gradient_s(config: PallasTpuConfig, n: int, v: int, d: int, *, itemsize: int = 2) -> float:
  """The roofline seconds of forward and backward: the sum of the kernels' bounds (they run one after another)."""
  return sum(k.bound_s for k in expected(config, n, v, d, itemsize=itemsize).values())


def three_gemm_floor(generation: str, n: int, v: int, d: int) -> float:
  """Seconds of the three N x V x D GEMMs that any loss + gradient needs (logits, dE, dC) at the MXU peak."""
  return 3 * 2.0 * n * v * d / GENERATIONS[generation].mxu_flops
