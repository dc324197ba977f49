"""The "pallas_tpu" kernels' expected time on a TPU from their block schedule: a roofline, not a measurement.

Each kernel takes at least the larger of its MXU time (its GEMM FLOPs at the generation's peak bf16 rate) and its
HBM time (the bytes its grid moves, at peak bandwidth). The bytes follow the grid: the forward reads every e
block once per vocabulary block and every c block once per token block; each gradient kernel reads them in both
of its stages (once when D is a single block: the block index does not change between the stages) and writes
its fp32 row blocks once. Elementwise work (exp, softcap) and the pipeline's bubbles are left out, so real times
are longer; the model says which resource bounds a shape and how far the four-GEMM schedule is from three.
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
  """Roofline times of "forward", "de" and "dc" on config.generation for N tokens, V entries, hidden size D and
  inputs of `itemsize` bytes."""
  gen = GENERATIONS[config.generation]
  t = config.tiles(n, v, d)
  gemm = 2.0 * n * v * d  # FLOPs of one N x V x D GEMM
  fwd_bytes = (base.cdiv(v, t.block_v) * n * d + base.cdiv(n, t.block_n) * v * d) * itemsize + 16 * n
  stages = 1 if t.grad_block_d >= d else 2
  width = base.cdiv(d, t.grad_block_d) * t.grad_block_d
  inputs = stages * (base.cdiv(v, t.grad_block_v) * n * d + base.cdiv(n, t.grad_block_n) * v * d) * itemsize
  de_bytes = inputs + 4 * n * width + 36 * n
  dc_bytes = inputs + 4 * v * width + 36 * n * base.cdiv(v, t.grad_block_v)
  time = lambda flops, nbytes: KernelTime(flops / gen.mxu_flops, nbytes / gen.hbm_bytes_per_s)
  return {"forward": time(gemm, fwd_bytes), "de": time(2 * gemm, de_bytes), "dc": time(2 * gemm, dc_bytes)}


def three_gemm_floor(generation: str, n: int, v: int, d: int) -> float:
  """Seconds of the three N x V x D GEMMs that any loss + gradient needs (logits, dE, dC) at the MXU peak."""
  return 3 * 2.0 * n * v * d / GENERATIONS[generation].mxu_flops
