"""FP8 formats `fp8_e4m3` (jnp.float8_e4m3fn, max 448) and `fp8_e5m2` (jnp.float8_e5m2, max 57344).

Scale s = amax / max over each block (per tensor, per channel, or 2-D blocks such as 128×128; a block of zeros
gets s = 1), float32; the element is x / s rounded to the FP8 grid (nearest, ties to even, saturating at ±max;
e5m2's inf is never produced) and stored in the jnp float8 dtype (8 bits). x̂ = element·s.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from cce_jax.quant.formats import base
from cce_jax.quant.formats import minifloat


@dataclasses.dataclass(frozen=True)
class FP8Format(base.Format):
  """An FP8 element grid with a float32 scale per block."""
  grid: minifloat.Minifloat = minifloat.E4M3
  allows_2d_blocks = True

  @property
  def code_dtype(self):
    return jnp.float8_e4m3fn if self.grid == minifloat.E4M3 else jnp.float8_e5m2

  def encode(self, x, reduce_axes):
    a = base.amax(x, reduce_axes)
    s = jnp.where(a > 0, a / jnp.float32(self.grid.max_value), 1.0).astype(jnp.float32)
    # Rounded on the grid in float32 first, so the cast is exact and saturation is explicit.
    return base.Encoded(self.grid.round(x / s).astype(self.code_dtype), s)

  def decode(self, codes, scales, zero_points=None, scale2=None):
    return codes.astype(jnp.float32) * scales


base.register("fp8_e4m3", lambda **kw: FP8Format("fp8_e4m3", grid=minifloat.E4M3, **kw))
base.register("fp8_e5m2", lambda **kw: FP8Format("fp8_e5m2", grid=minifloat.E5M2, **kw))
