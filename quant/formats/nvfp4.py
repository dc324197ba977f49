"""NVFP4 (`nvfp4`): e2m1 elements, an e4m3 scale per block of 16, and an fp32 per-tensor scale.

Per tensor: g = amax(x) / (6·448) (float32; 1 when x is all zeros), stored as `scale2`. Per block (16 elements
along the contraction axis by default): b = e4m3(amax_block / 6 / g), rounded to the e4m3 grid (nearest, ties to
even, saturating at 448) and stored as float8_e4m3fn. Elements: x / (b·g) rounded to the e2m1 grid
{0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6} (nearest, ties to even, saturating); a block whose b is 0 (all zeros, or so
small that b underflows e4m3) decodes to zeros. x̂ = element·b·g. Storage: codes two per byte, 8 bits of scale per
block, 32 bits per tensor.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from cce_jax.quant.formats import base
from cce_jax.quant.formats import minifloat

_E2M1 = minifloat.E2M1
_E4M3 = minifloat.E4M3


@dataclasses.dataclass(frozen=True)
class NVFP4Format(base.Format):
  """NVFP4; see the module docstring."""
  container_bits = 4
  default_group = 16

  def encode(self, x, reduce_axes):
    t = jnp.max(jnp.abs(x))
    g = jnp.where(t > 0, t / jnp.float32(_E2M1.max_value * _E4M3.max_value), 1.0).astype(jnp.float32)
    b = _E4M3.round(base.amax(x, reduce_axes) / jnp.float32(_E2M1.max_value) / g)
    denom = b * g
    r = _E2M1.round(jnp.where(denom > 0, x / jnp.where(denom > 0, denom, 1.0), 0.0))
    return base.Encoded(_E2M1.to_code(r), b.astype(jnp.float8_e4m3fn), scale2=g)

  def decode(self, codes, scales, zero_points=None, scale2=None):
    return _E2M1.from_code(codes) * (scales.astype(jnp.float32) * scale2)


base.register("nvfp4", lambda **kw: NVFP4Format("nvfp4", **kw))
