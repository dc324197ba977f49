"""Block sizes for the blockwise implementations, with a per-shape heuristic."""

from __future__ import annotations

import dataclasses

# Elements of one [block_n, block_v] fp32 logit tile. 2^20 elements (4 MiB) keeps the few live tiles of the
# XLA program far below the materialised N×V logits while the tile GEMMs stay large enough to run well.
_TILE_ELEMENTS = 1 << 20
_MAX_BLOCK_V = 1024


@dataclasses.dataclass(frozen=True)
class XlaChunkedConfig:
  """Tile shape of the `"xla_chunked"` implementation.

  The loss is computed over tiles of `block_n` tokens × `block_v` vocabulary entries; only one tile of logits
  (fp32) is live at a time. Neither block needs to divide its dimension: the last block is moved back to end at
  the edge and its already-visited rows/columns are masked, so no input is padded or copied.

  Attributes:
    block_n: tokens per tile, >= 1. Clamped to N.
    block_v: vocabulary entries per tile, >= 1. Clamped to V.
  """

  block_n: int
  block_v: int

  def __post_init__(self):
    for name in ("block_n", "block_v"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"XlaChunkedConfig.{name} must be a positive int, got {value!r}")

  @classmethod
  def for_shape(cls, n: int, v: int, d: int) -> "XlaChunkedConfig":
    """The default tile for N tokens, V vocabulary entries and hidden size D."""
    del d  # The tile bounds the N×V temporaries; D only sets the GEMM depth.
    block_v = min(v, _MAX_BLOCK_V)
    block_n = max(1, min(n, _TILE_ELEMENTS // block_v))
    return cls(block_n=block_n, block_v=block_v)

  def clamped(self, n: int, v: int) -> "XlaChunkedConfig":
    """The same config with each block no larger than its dimension."""
    return XlaChunkedConfig(block_n=min(self.block_n, max(n, 1)), block_v=min(self.block_v, v))


def pow2_floor(x: int) -> int:
  """The largest power of 2 <= x (1 for x < 2)."""
  return 1 << (max(int(x), 1).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig:
  """Tile shape and launch parameters of the `"pallas_gpu"` kernels (Triton; the forward Mosaic GPU on Hopper).

  The attributes say what each field does; measured timings of the defaults and of the alternatives are in
  BENCHMARKS.md.

  Attributes:
    block_n: tokens per tile (power of 2; Triton's dot wants >= 16 on a GPU).
    block_v: vocabulary entries per tile (power of 2).
    block_d: hidden-size chunk per step of the GEMM loop (power of 2); D need not be a multiple.
    num_warps: warps per program (of the forward; of the backward too unless backward_warps is set).
    num_stages: software-pipelining depth of the D loop.
    num_splits: vocabulary splits of the forward grid; None picks enough to fill the GPU.
    flat_loop: the forward walks (vocabulary tile, D chunk) pairs in one loop instead of two nested ones.
    backward_warps: warps per program of the backward kernel; None: num_warps.
    dense_backward_above: with gradient filtering, when more than this fraction of the logit tiles may pass the
      filter (a bound from the forward's per-row tile maxima), the backward runs the dense blockwise GEMMs instead
      of the tile-skipping kernels, which cost more than dense GEMMs when most tiles are kept. 1.0: always the
      tile-skipping kernels; 0.0: always dense.
    dense_block_v, dense_block_elements: the dense backward's vocabulary block and its logits per block (fp32:
      2^26 logits are 256 MiB).
    backward_buffer_bytes: the tile-skipping backward's dZ buffer (kept tiles in the compute dtype); more kept
      tiles than it holds run in several passes. None: 2^27 bytes, or 2^23 with low_memory (`buffer_bytes`).
    low_memory: the filtered backward (filter_eps set, exact=False) in little memory (an 8 MiB dZ buffer, the
      tile lists and two fp32 carries): the forward codes each row's largest logit per tile against an estimate
      of the row's LSE from a vocabulary sample (`lse_estimate`; a 2-bit code per row and tile from the Mosaic
      forward, one value per tile from Triton's, a coarser mask) and turns that into the keep mask at once; the
      kept tiles run in two sweeps over the dZ buffer, dC then dE, each gradient written once from fp32 sums
      (`swept_backward`: no fp32 dE, no dense fallback, every kept tile's dZ computed twice). Deterministic.
      Fast where few tiles are kept (peaked softmaxes), slow where many are. False (default): the tile-skipping
      backward of `compact_backward` (one dZ per kept tile, a 128 MiB buffer, an fp32 dE) with a dense fallback
      when most tiles are kept. Exact mode and filter_eps=None keep the dense backward.
    grad_block_d: the hidden-size block of each gradient program of the tile-skipping backward (power of 2).
    grad_block_n: the token tile of the tile-skipping backward and its keep mask (power of 2, >= 16 on a GPU).
      Smaller tiles skip more: on peaked inputs a kept tile is mostly there for one row's target, so the kept
      work scales with grad_block_n.
    sort_vocabulary: with gradient filtering, reorder the vocabulary by decreasing mean logit over the batch
      before the kernels, so that the entries with non-negligible softmax share logit tiles and fewer tiles are
      kept (CCE §4.3). Costs a permuted copy of c (V × D) and a scatter of dC; helps on real, Zipf-like
      distributions, not on uniformly random targets.
    forward_kernel: "auto" (the Mosaic GPU forward on Hopper GPUs where it applies, else Triton), "triton", or
      "mosaic" (an error where it does not apply). The Mosaic forward (`mosaic_forward`: wgmma + TMA, warp
      specialised) needs bf16 e and c, no bias and D a multiple of 16 (V % 8 != 0 costs a padded copy of c),
      and fixes its own 128 × 256 CTA tiles (block_n, block_d, num_warps and num_stages are the Triton
      forward's); num_splits applies to both.
    dense_backward_kernel: the dense backward (exact mode, filter_eps=None, and the filtered mode's fallback when
      most tiles are kept): "auto" takes its dZ from the Mosaic GPU kernel of `mosaic_dlogits` on Hopper GPUs
      where it applies (same conditions as the Mosaic forward), else from XLA; "xla"; or "mosaic" (an error
      where it does not apply).
    forward_gradient: a reduced loss ("mean" or "sum") without filtering or exact mode forms its gradient in the
      forward pass (`forward_gradient`: three N·V·D GEMMs instead of four, for a workspace): "auto" on Hopper GPUs
      where it applies (the Mosaic forward's conditions; no vocabulary split, return_lse, or label smoothing
      with a softcap), "off", or "mosaic" (an error where the kernel cannot run these inputs).
    forward_gradient_bytes: that path's workspace: the bf16 [tokens, V] block of exp(s - ref)·ds/dz of one chunk
      of tokens (at least 128 tokens); the fp32 [V, D] dC accumulator comes on top.
    approx_math: the Mosaic kernels' exp2 and tanh use the GPU's approximate instructions (loss error ~1e-6
      relative).
  """

  block_n: int = 128
  block_v: int = 128
  block_d: int = 64
  num_warps: int = 8
  num_stages: int = 3
  num_splits: int | None = None
  flat_loop: bool = False
  backward_warps: int | None = None
  dense_backward_above: float = 0.5
  dense_block_v: int = 8192
  dense_block_elements: int = 1 << 26
  backward_buffer_bytes: int | None = None
  grad_block_d: int = 128
  grad_block_n: int = 32
  sort_vocabulary: bool = False
  forward_kernel: str = "auto"
  dense_backward_kernel: str = "auto"
  approx_math: bool = True
  low_memory: bool = False
  forward_gradient: str = "auto"
  forward_gradient_bytes: int = 1 << 31

  def __post_init__(self):
    for name in ("block_n", "block_v", "block_d", "grad_block_d", "grad_block_n"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise ValueError(f"PallasGpuConfig.{name} must be a positive power of 2, got {value!r}")
    for name in ("num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PallasGpuConfig.{name} must be a positive int, got {value!r}")
    if self.backward_warps is not None and (not isinstance(self.backward_warps, int) or self.backward_warps < 1):
      raise ValueError(f"PallasGpuConfig.backward_warps must be a positive int or None, got {self.backward_warps!r}")
    if not isinstance(self.dense_backward_above, (int, float)) or not 0.0 <= self.dense_backward_above <= 1.0:
      raise ValueError("PallasGpuConfig.dense_backward_above must be a fraction in [0, 1], got "
                       f"{self.dense_backward_above!r}")
    if self.backward_buffer_bytes is not None and (
        not isinstance(self.backward_buffer_bytes, int) or isinstance(self.backward_buffer_bytes, bool)
        or self.backward_buffer_bytes < 1):
      raise ValueError("PallasGpuConfig.backward_buffer_bytes must be a positive int or None, got "
                       f"{self.backward_buffer_bytes!r}")
    if not isinstance(self.low_memory, bool):
      raise ValueError(f"PallasGpuConfig.low_memory must be a bool, got {self.low_memory!r}")
    if not isinstance(self.sort_vocabulary, bool):
      raise ValueError(f"PallasGpuConfig.sort_vocabulary must be a bool, got {self.sort_vocabulary!r}")
    if self.forward_kernel not in ("auto", "triton", "mosaic"):
      raise ValueError("PallasGpuConfig.forward_kernel must be 'auto', 'triton' or 'mosaic', got "
                       f"{self.forward_kernel!r}")
    if self.dense_backward_kernel not in ("auto", "xla", "mosaic"):
      raise ValueError("PallasGpuConfig.dense_backward_kernel must be 'auto', 'xla' or 'mosaic', got "
                       f"{self.dense_backward_kernel!r}")
    if self.forward_gradient not in ("auto", "off", "mosaic"):
      raise ValueError("PallasGpuConfig.forward_gradient must be 'auto', 'off' or 'mosaic', got "
                       f"{self.forward_gradient!r}")
    if (not isinstance(self.forward_gradient_bytes, int) or isinstance(self.forward_gradient_bytes, bool)
        or self.forward_gradient_bytes < 1):
      raise ValueError("PallasGpuConfig.forward_gradient_bytes must be a positive int, got "
                       f"{self.forward_gradient_bytes!r}")
    if not isinstance(self.approx_math, bool):
      raise ValueError(f"PallasGpuConfig.approx_math must be a bool, got {self.approx_math!r}")
    if self.num_splits is not None and (not isinstance(self.num_splits, int) or self.num_splits < 1):
      raise ValueError(f"PallasGpuConfig.num_splits must be a positive int or None, got {self.num_splits!r}")

  @classmethod
  def for_shape(cls, n: int, v: int, d: int, *, softcap: float | None = None,
                filtered: bool = False) -> "PallasGpuConfig":
    """The default for N tokens, V vocabulary entries, hidden size D, the softcap and gradient filtering.

    128×128×64 tiles, 3 stages. The forward runs 4 warps when its per-element work is light (no softcap: two
    programs share an SM and hide each other's epilogue) and 8 with a softcap's tanh, except when filtering: then
    it also writes every row's tile maxima, and 4 warps are faster again. The backward runs 8. (The sweeps behind
    these choices: BENCHMARKS.md.)
    """
    del n, v, d
    return cls(num_warps=8 if softcap is not None and not filtered else 4, backward_warps=8)

  def clamped(self, n: int, v: int, d: int) -> "PallasGpuConfig":
    """Each block no larger than the largest power of 2 within its dimension."""
    return dataclasses.replace(
        self, block_n=min(self.block_n, pow2_floor(n)), block_v=min(self.block_v, pow2_floor(v)),
        block_d=min(self.block_d, pow2_floor(d)), grad_block_n=min(self.grad_block_n, pow2_floor(n)))

  @property
  def buffer_bytes(self) -> int:
    """The tile-skipping backward's dZ buffer in bytes (`backward_buffer_bytes`, or its default for the mode)."""
    if self.backward_buffer_bytes is not None:
      return self.backward_buffer_bytes
    return 1 << 23 if self.low_memory else 1 << 27

  @property
  def bwd_warps(self) -> int:
    return self.num_warps if self.backward_warps is None else self.backward_warps

  def num_splits_for(self, n: int, v: int) -> int:
    if self.num_splits is not None:
      return min(self.num_splits, -(-v // self.block_v))
    token_tiles = -(-n // self.block_n)
    return max(1, min(-(-512 // token_tiles), -(-v // self.block_v)))

  def exact_backward_tiles(self, n: int, v: int) -> XlaChunkedConfig:
    """Tiles of the dense backward (blockwise XLA GEMMs; exact mode, no filtering, or most tiles kept): large,
    for speed, at most `dense_block_elements` logits (fp32) per block."""
    block_v = min(v, self.dense_block_v)
    return XlaChunkedConfig(block_n=max(1, min(n, self.dense_block_elements // block_v)), block_v=block_v)
