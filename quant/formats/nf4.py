"""NF4 (`nf4`, QLoRA): the 16-value NormalFloat table times an absmax scale per block of 64.

Per block (64 elements along the contraction axis by default; for Flax `[in, out]` kernels with axis=0 the blocks
run down the input dimension of each output column): s = amax (1 for a block of zeros), the element is the index of
the table entry nearest to x / s (ties, which random data never hits, go to the lower index), x̂ = table[q]·s.
Codes two per byte.

Scales: float32 (32 bits per block), or with `double_quant=True` quantized again: the scales are taken in blocks of
256 (along the flattened scale array, padded), each with an fp32 second-level scale c = max / 255, and stored as
uint8 round(s / c) (a scale below c/2 decodes to 0, zeroing its block); 8 + 32/256 bits per block. (QLoRA stores them as 8-bit floats after subtracting their mean; this
unsigned-integer variant has the same storage cost.)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from cce_jax.quant.formats import base

NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
"""The NF4 code table of QLoRA (Dettmers et al. 2023, appendix E), code q ↦ NF4_TABLE[q]."""

DOUBLE_QUANT_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class NF4Format(base.Format):
  """NF4; see the module docstring."""
  double_quant: bool = False
  container_bits = 4
  default_group = 64

  def encode(self, x, reduce_axes):
    a = base.amax(x, reduce_axes)
    s = jnp.where(a > 0, a, 1.0).astype(jnp.float32)
    table = jnp.asarray(NF4_TABLE)
    mids = (table[1:] + table[:-1]) / 2
    q = jnp.searchsorted(mids, x / s, side="left").astype(jnp.uint8)  # the nearest entry; a tie goes lower
    if not self.double_quant:
      return base.Encoded(q, s)
    flat = s.reshape(-1)
    pad = -flat.size % DOUBLE_QUANT_BLOCK
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK)
    c = (jnp.max(blocks, axis=1, keepdims=True) / 255.0).astype(jnp.float32)
    codes = jnp.clip(jnp.round(blocks / c), 0, 255).astype(jnp.uint8)
    return base.Encoded(q, codes.reshape(-1)[:flat.size].reshape(s.shape), scale2=c)

  def decode(self, codes, scales, zero_points=None, scale2=None):
    values = jnp.asarray(NF4_TABLE)[codes.astype(jnp.int32)]
    if not self.double_quant:
      return values * scales
    flat = scales.reshape(-1)
    pad = -flat.size % DOUBLE_QUANT_BLOCK
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK).astype(jnp.float32) * scale2
    return values * blocks.reshape(-1)[:flat.size].reshape(scales.shape)


base.register("nf4", lambda **kw: NF4Format("nf4", **kw))
