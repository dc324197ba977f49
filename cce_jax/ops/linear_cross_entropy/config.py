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
