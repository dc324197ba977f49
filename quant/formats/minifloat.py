"""Small floating-point element grids (e4m3, e5m2, e2m3, e2m1) without inf: rounding and 4/6-bit codes.

A grid `Minifloat(ebits, mbits, max_value)` holds ±0, the subnormals k·2^(emin−mbits) (k < 2^mbits) and the
normals (1 + k/2^mbits)·2^e for emin ≤ e, up to `max_value`; emin = 2 − 2^(ebits−1) (bias 2^(ebits−1) − 1).
Rounding is to nearest, ties to even, saturating at ±max_value (the OCP MX and NVFP4 conversion rule).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Minifloat:
  """An element grid; see the module docstring."""
  ebits: int
  mbits: int
  max_value: float

  @property
  def emin(self) -> int:
    return 2 - 2 ** (self.ebits - 1)

  @property
  def emax(self) -> int:
    """floor(log2(max_value)): the exponent of the largest normal (OCP's emax_elem)."""
    return math.floor(math.log2(self.max_value))

  def round(self, v):
    """`v` (float32) rounded to the grid: nearest, ties to even, saturating. float32 out."""
    mag = jnp.abs(v)
    _, p = jnp.frexp(mag)  # mag = m·2^p with m in [0.5, 1): floor(log2 mag) = p − 1, exactly
    e = jnp.maximum(p - 1, self.emin)
    step = jnp.ldexp(jnp.float32(1.0), e - self.mbits)
    r = jnp.minimum(jnp.round(mag / step) * step, self.max_value)
    return jnp.where(v < 0, -r, r).astype(jnp.float32)

  def to_code(self, r):
    """Codes (uint8: sign bit above 1+ebits+mbits−1 magnitude bits) of grid values `r`."""
    mag = jnp.abs(r)
    _, p = jnp.frexp(mag)
    e = jnp.maximum(p - 1, self.emin)
    sub = mag < 2.0 ** self.emin
    mant = jnp.round(mag / jnp.ldexp(jnp.float32(1.0), e - self.mbits)).astype(jnp.int32)
    normal_code = ((e - self.emin + 1) << self.mbits) + mant - (1 << self.mbits)
    code = jnp.where(sub, mant, normal_code)
    sign = jnp.where(r < 0, 1 << (self.ebits + self.mbits), 0)
    return (code + sign).astype(jnp.uint8)

  def from_code(self, code):
    """Grid values (float32) of codes made by `to_code`."""
    code = code.astype(jnp.int32)
    nbits = self.ebits + self.mbits
    sign = jnp.where((code >> nbits) & 1 == 1, -1.0, 1.0)
    mag_code = code & ((1 << nbits) - 1)
    e_field = mag_code >> self.mbits
    mant = (mag_code & ((1 << self.mbits) - 1)).astype(jnp.float32)
    e = jnp.maximum(e_field, 1) + self.emin - 1
    frac = jnp.where(e_field == 0, mant, mant + (1 << self.mbits))
    return (sign * jnp.ldexp(frac, e - self.mbits)).astype(jnp.float32)


E4M3 = Minifloat(4, 3, 448.0)
E5M2 = Minifloat(5, 2, 57344.0)
E2M3 = Minifloat(2, 3, 7.5)
E2M1 = Minifloat(2, 1, 6.0)
