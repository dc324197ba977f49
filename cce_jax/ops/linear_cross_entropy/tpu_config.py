"""Block sizes of the "pallas_tpu" kernels: a frozen config, a heuristic per TPU generation and the VMEM check.

Not yet tuned on a TPU: the defaults follow the roofline of each generation (below) and its VMEM, nothing measured.
A token block of bn rows reads each classifier row once per bn tokens (bn FLOP per byte of c at bf16), and a
vocabulary block of bv rows each hidden state once per bv entries; both blocks sit above the generation's ridge
point (peak MXU FLOP/s / HBM bytes/s) where VMEM allows, and are multiples of the MXU width (128; 256 on v6e).
The backward ("fused" or "split") and the fused backward's tiles are those the roofline (`tpu_roofline`) expects
fastest for the shape; at the benchmark shapes that is the fused backward on every generation.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

# Sublanes x lanes of a 32-bit TPU vreg: a block's second-to-last dimension is a multiple of 8, its last of 128
# (or the whole dimension).
SUBLANES, LANES = 8, 128


class TpuGeneration(NamedTuple):
  """One TPU chip's peak dense bf16 MXU FLOP/s, HBM bandwidth (bytes/s), VMEM per TensorCore (bytes), MXU width
  and TensorCores (2 on the megacore chips, v4 and v5p, whose "parallel" grid dimensions are split over both).
  Public spec sheets (cloud.google.com/tpu/docs/system-architecture-tpu-vm); VMEM as jax's `tpu_info`."""

  mxu_flops: float
  hbm_bytes_per_s: float
  vmem_bytes: int
  mxu: int
  cores: int = 1

  @property
  def ridge(self) -> float:
    """FLOP per HBM byte at which a kernel stops being bandwidth-bound."""
    return self.mxu_flops / self.hbm_bytes_per_s


GENERATIONS = {
    "v4": TpuGeneration(275e12, 1.2e12, 16 << 20, 128, 2),
    "v5e": TpuGeneration(197e12, 0.819e12, 128 << 20, 128, 1),
    "v5p": TpuGeneration(459e12, 2.765e12, 64 << 20, 128, 2),
    "v6e": TpuGeneration(918e12, 1.64e12, 128 << 20, 256, 1),
}
# The share of VMEM a config may plan for (Mosaic's own buffers and the compiler's temporaries take the rest).
_VMEM_SHARE = 0.75
# [bn, bv] fp32 temporaries live at once in a kernel's tile epilogue (s, exp(s - m), masks, dS) beside the
# accumulator.
_TILE_TEMPORARIES = 4


def generation_of(device_kind: str) -> str | None:
  """The generation key of a TPU device kind ("TPU v5 lite" -> "v5e"), None for others."""
  kind = device_kind.lower().replace(" ", "")
  for key, names in (("v6e", ("v6e", "v6lite")), ("v5e", ("v5e", "v5lite")), ("v5p", ("v5p", "tpuv5")),
                     ("v4", ("tpuv4",))):
    if any(name in kind for name in names):
      return key
  return None


def default_generation() -> str:
  """The generation of the default device when it is a TPU, else "v5e" (what interpreted runs plan for)."""
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return "v5e"
  return (generation_of(device.device_kind) if device.platform == "tpu" else None) or "v5e"


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig:
  """Tiles of the `"pallas_tpu"` kernels (Mosaic TPU) and the generation whose VMEM they are checked against.

  Attributes:
    block_n, block_v, block_d: the forward's token, vocabulary and hidden-size blocks (grid: token blocks,
      vocabulary blocks, hidden-size blocks; an fp32 [block_n, block_v] logit tile in VMEM).
    grad_block_n, grad_block_v, grad_block_d: the backward's. The split backward's dE kernel keeps an fp32
      [grad_block_n, D] row block of dE in VMEM, its dC kernel an fp32 [grad_block_v, D] one; the fused backward
      keeps the dC row block and read-modify-writes fp32 [grad_block_n, grad_block_d] tiles of dE in HBM.
    backward: "fused" (`tpu_fused_backward`: one kernel, each logit tile recomputed once for dE and dC, four
      N·V·D GEMMs in forward and backward) or "split" (`tpu_backward`: a dE and a dC kernel, five GEMMs).
    generation: "v4", "v5e", "v5p" or "v6e": the VMEM budget `check_vmem` holds the tiles to.
    vmem_limit_bytes: Mosaic's scoped VMEM limit; None: the planned need plus a quarter (at least 16 MiB, at most
      90% of the generation's VMEM).

  block_n and grad_block_n are multiples of 8, the others of 128 (the TPU's 8 x 128 tiles); a block at least
  as large as its dimension becomes the whole dimension (`tiles`), which any size may be.
  """

  block_n: int = 512
  block_v: int = 1024
  block_d: int = 512
  grad_block_n: int = 256
  grad_block_v: int = 512
  grad_block_d: int = 512
  generation: str = "v5e"
  vmem_limit_bytes: int | None = None
  backward: str = "fused"

  def __post_init__(self):
    for name in ("block_n", "block_v", "block_d", "grad_block_n", "grad_block_v", "grad_block_d"):
      value = getattr(self, name)
      step = SUBLANES if name.endswith("_n") else LANES
      if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value % step:
        raise ValueError(f"PallasTpuConfig.{name} must be a positive multiple of {step}, got {value!r}")
    if self.generation not in GENERATIONS:
      raise ValueError(f"PallasTpuConfig.generation must be one of {tuple(GENERATIONS)}, got {self.generation!r}")
    if self.backward not in ("fused", "split"):
      raise ValueError(f"PallasTpuConfig.backward must be 'fused' or 'split', got {self.backward!r}")
    if self.vmem_limit_bytes is not None and (not isinstance(self.vmem_limit_bytes, int)
                                              or isinstance(self.vmem_limit_bytes, bool)
                                              or self.vmem_limit_bytes < 1):
      raise ValueError(f"PallasTpuConfig.vmem_limit_bytes must be a positive int or None, got "
                       f"{self.vmem_limit_bytes!r}")

  @classmethod
  def for_shape(cls, n: int, v: int, d: int, *, itemsize: int = 4, generation: str | None = None,
                backward: str | None = None) -> "PallasTpuConfig":
    """The default for N tokens, V entries, hidden size D and inputs of `itemsize` bytes on `generation` (None:
    the default device's). The forward's and the split backward's tiles: the largest square ones, from 1024
    down, that fit the generation's VMEM budget. The fused backward's: of the token, vocabulary (up to 2048) and
    hidden-size blocks (512, 1024 or the whole D) that fit, those the roofline (`tpu_roofline`) expects
    fastest. backward None: whichever of "fused" and "split" the roofline expects faster with its tiles."""
    from cce_jax.ops.linear_cross_entropy import tpu_roofline  # pylint: disable=g-import-not-at-top (a cycle)
    generation = generation or default_generation()
    budget, mxu = _budget(generation), GENERATIONS[generation].mxu
    sizes = [s for s in (1024, 768, 512, 256, 128) if s % mxu == 0]
    fwd = next((b for b in sizes if _forward_bytes(b, b, 512, itemsize) <= budget), sizes[-1])
    bwd = next((b for b in sizes if _backward_bytes(b, b, min(512, d), d, itemsize) <= budget), sizes[-1])
    split = cls(block_n=fwd, block_v=fwd, block_d=512, grad_block_n=bwd, grad_block_v=bwd, grad_block_d=512,
                generation=generation, backward="split")
    if backward == "split":
      return split
    fused = []
    for bn in sizes:
      for bv in [2048] + sizes:
        for bd in sorted({512, 1024, _lanes(d)}):
          if bv % mxu == 0 and _fused_backward_bytes(bn, bv, min(bd, d), d, itemsize) <= budget:
            fused.append(dataclasses.replace(split, grad_block_n=bn, grad_block_v=bv, grad_block_d=bd,
                                             backward="fused"))
    if not fused:  # no fused tiles fit (D too large for the generation's VMEM): the split tiles' check says so
      return split if backward is None else dataclasses.replace(split, backward="fused")
    model = lambda cfg: tpu_roofline.loss_and_gradient_s(cfg, n, v, d, itemsize=itemsize)
    # Fastest, then fewest bytes, then the largest tiles (the roofline ties wherever the MXU bounds).
    key = lambda cfg: (model(cfg), sum(k.hbm_s for k in tpu_roofline.expected(cfg, n, v, d).values()),
                       -cfg.grad_block_n * cfg.grad_block_v)
    best = min(fused, key=key)
    if backward == "fused":
      return best
    return best if model(best) <= model(split) else split

  def tiles(self, n: int, v: int, d: int) -> "Tiles":
    """The blocks that run on N tokens, V entries and hidden size D: each no larger than its dimension (a whole
    dimension is a valid block of any size)."""
    fit = lambda block, size: max(1, min(block, size))
    return Tiles(fit(self.block_n, n), fit(self.block_v, v), fit(self.block_d, d), fit(self.grad_block_n, n),
                 fit(self.grad_block_v, v), fit(self.grad_block_d, d))

  def check_vmem(self, n: int, v: int, d: int, itemsize: int) -> None:
    """A one-line ValueError when the planned VMEM of either kernel exceeds the generation's budget."""
    tiles, budget = self.tiles(n, v, d), _budget(self.generation)
    for what, need, fields in (("forward", tiles.forward_vmem(itemsize), "block_n/block_v/block_d"),
                               (f"{self.backward} backward", self.backward_vmem(n, v, d, itemsize),
                                "grad_block_n/grad_block_v")):
      if need > budget:
        raise ValueError(f"PallasTpuConfig: the {what} tiles need {need / 2**20:.1f} MiB of VMEM at D={d}, above "
                         f"{self.generation}'s {budget / 2**20:.0f} MiB budget; lower {fields}")

  def backward_vmem(self, n: int, v: int, d: int, itemsize: int) -> int:
    """The planned VMEM bytes of the configured backward's kernel(s)."""
    tiles = self.tiles(n, v, d)
    return tiles.fused_backward_vmem(d, itemsize) if self.backward == "fused" else tiles.backward_vmem(d, itemsize)

  def vmem_limit(self, need: int) -> int:
    """Mosaic's scoped VMEM limit for a kernel planned at `need` bytes."""
    if self.vmem_limit_bytes is not None:
      return self.vmem_limit_bytes
    return int(min(max(need * 5 // 4, 16 << 20), GENERATIONS[self.generation].vmem_bytes * 0.9))


class Tiles(NamedTuple):
  """The blocks of one launch (`PallasTpuConfig.tiles`): the forward's and the backward's."""

  block_n: int
  block_v: int
  block_d: int
  grad_block_n: int
  grad_block_v: int
  grad_block_d: int

  def forward_vmem(self, itemsize: int) -> int:
    return _forward_bytes(self.block_n, self.block_v, self.block_d, itemsize)

  def backward_vmem(self, d: int, itemsize: int) -> int:
    return _backward_bytes(self.grad_block_n, self.grad_block_v, self.grad_block_d, d, itemsize)

  def fused_backward_vmem(self, d: int, itemsize: int) -> int:
    return _fused_backward_bytes(self.grad_block_n, self.grad_block_v, self.grad_block_d, d, itemsize)


def _budget(generation: str) -> int:
  return int(GENERATIONS[generation].vmem_bytes * _VMEM_SHARE)


def _lanes(x: int) -> int:
  return -(-x // LANES) * LANES


def _forward_bytes(bn, bv, bd, itemsize):
  """Double-buffered e and c blocks, the fp32 logit tile and its temporaries, the per-row state (lane-padded)."""
  inputs = 2 * (bn + bv) * _lanes(bd) * itemsize
  return inputs + (1 + _TILE_TEMPORARIES) * bn * _lanes(bv) * 4 + 16 * bn * LANES * 4


def _backward_bytes(bn, bv, bd, d, itemsize):
  """The larger of the two gradient kernels: the double-buffered fp32 row block of dE ([bn, D]) or dC
  ([bv, D]), the e and c blocks, the logit tile, its dZ and temporaries."""
  rows = max(bn, bv)
  blocks = -(-d // bd) * bd if bd < d else d
  resident = 2 * rows * _lanes(blocks) * 4
  inputs = 2 * (bn + bv) * _lanes(bd) * itemsize
  return resident + inputs + (2 + _TILE_TEMPORARIES) * bn * _lanes(bv) * 4 + 8 * rows * LANES * 4


def _fused_backward_bytes(bn, bv, bd, d, itemsize):
  """The fused backward: the double-buffered fp32 row block of dC ([bv, D]) and its bias gradient, the e and c
  blocks, the logit tile, its dZ and temporaries, the fp32 [bn, bd] dE tile it read-modify-writes."""
  blocks = -(-d // bd) * bd if bd < d else d
  resident = 2 * bv * _lanes(blocks) * 4 + 2 * SUBLANES * _lanes(bv) * 4
  inputs = 2 * (bn + bv) * _lanes(bd) * itemsize
  return (resident + inputs + (2 + _TILE_TEMPORARIES) * bn * _lanes(bv) * 4 + bn * _lanes(bd) * 4
          + 4 * bn * LANES * 4)
