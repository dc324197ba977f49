"""OCP Microscaling (MX v1.0) formats `mxfp8` (e4m3 elements), `mxfp6` (e2m3) and `mxfp4` (e2m1).

Each block of `group_size` elements (32 by the spec) along the contraction axis shares one power of two X = 2^E,
stored as an e8m0 byte (E + 127, E clipped to [−127, 127]). The exponent rule is an option, `scale_rule`:

- "floor" (default, the OCP v1.0 rule and microxcaling's): E = floor(log2(amax)) − emax_elem, where emax_elem is
  the exponent of the element's largest normal (8 for e4m3, 2 for e2m3 and e2m1). Elements above the element
  maximum (up to ~1.33× it for e2m1) saturate.
- "ceil" (the rule that avoids saturation): E = ceil(log2(amax / max_elem)), the smallest E with
  amax / 2^E ≤ max_elem (max_elem = 448, 7.5, 6).

A block of zeros gets E = −127. Elements are x / X rounded to the element grid (nearest, ties to even, saturating).
Storage: mxfp8 elements as float8_e4m3fn; mxfp6 codes one per byte (8 bits: 6-bit packing is not implemented);
mxfp4 codes two per byte. Plus 8 bits of scale per block.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from cce_jax.quant.formats import base
from cce_jax.quant.formats import minifloat

SCALE_RULES = ("floor", "ceil")


def shared_exponent(a, grid: minifloat.Minifloat, rule: str):
  """The shared exponent E (int32) of blocks with absolute maxima `a` (float32), by `rule` (module docstring)."""
  if rule not in SCALE_RULES:
    raise ValueError(f"unknown MX scale_rule {rule!r}; known: {', '.join(SCALE_RULES)}")
  _, p = jnp.frexp(a)
  if rule == "floor":
    e = p - 1 - grid.emax
  else:
    # Start from floor(log2(a / max)) + 1 and correct by one either way with exact power-of-two products.
    _, q = jnp.frexp(a / jnp.float32(grid.max_value))
    e = q
    e = jnp.where(a > grid.max_value * jnp.ldexp(jnp.float32(1.0), e), e + 1, e)
    e = jnp.where(a <= grid.max_value * jnp.ldexp(jnp.float32(1.0), e - 1), e - 1, e)
  return jnp.clip(jnp.where(a > 0, e, -127), -127, 127).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class MXFormat(base.Format):
  """MX elements of `grid` with an e8m0 scale per block; see the module docstring."""
  grid: minifloat.Minifloat = minifloat.E2M1
  scale_rule: str = "floor"
  default_group = 32

  def __post_init__(self):
    if self.scale_rule not in SCALE_RULES:
      raise ValueError(f"unknown MX scale_rule {self.scale_rule!r}; known: {', '.join(SCALE_RULES)}")

  @property
  def container_bits(self) -> int:
    return 4 if self.grid == minifloat.E2M1 else 8

  @property
  def code_dtype(self):
    return jnp.float8_e4m3fn if self.grid == minifloat.E4M3 else jnp.uint8

  def encode(self, x, reduce_axes):
    e = shared_exponent(base.amax(x, reduce_axes), self.grid, self.scale_rule)
    r = self.grid.round(jnp.ldexp(x, -e))
    codes = r.astype(jnp.float8_e4m3fn) if self.grid == minifloat.E4M3 else self.grid.to_code(r)
    return base.Encoded(codes, (e + 127).astype(jnp.uint8))

  def decode(self, codes, scales, zero_points=None, scale2=None):
    r = codes.astype(jnp.float32) if self.grid == minifloat.E4M3 else self.grid.from_code(codes)
    return jnp.ldexp(r, scales.astype(jnp.int32) - 127)


for _name, _grid in (("mxfp8", minifloat.E4M3), ("mxfp6", minifloat.E2M3), ("mxfp4", minifloat.E2M1)):
  base.register(_name, lambda _n=_name, _g=_grid, **kw: MXFormat(_n, grid=_g, **kw))
