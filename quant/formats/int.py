"""Integer formats: symmetric `int8`, `int4`, `int3`, `int2` and asymmetric `uint8`, `uint4`, `uint3`.

Symmetric (b bits): scale s = amax / divisor over each block (divisor defaults to 2^(b−1) − 1: 127, 7, 3, 1;
`get_format("int4", divisor=7.5)` gives the amax/7.5 convention, which uses the code −8), q = clip(round(x / s),
−2^(b−1), 2^(b−1) − 1) with round half to even, x̂ = q·s. Grid: the integers times s.
Asymmetric (b bits): the block's range is widened to contain 0, lo = min(min x, 0), hi = max(max x, 0);
s = (hi − lo) / (2^b − 1), zero point z = round(−lo / s) (an integer in [0, 2^b − 1], stored uint8),
q = clip(round(x / s) + z, 0, 2^b − 1), x̂ = (q − z)·s; 0 is represented exactly.
A block of zeros gets s = 1 (and z = 0). Scales are float32 (32 bits per block).
Storage: codes q + 2^(b−1) (symmetric) or q (asymmetric) as uint8; 4- and 3-bit codes two per byte, 2-bit codes
four per byte (so int3/uint3 cost 4 bits per weight of storage).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from cce_jax.quant.formats import base


@dataclasses.dataclass(frozen=True)
class IntFormat(base.Format):
  """b-bit integers with a float32 scale per block (and a zero point when `signed` is False)."""
  bits: int = 8
  signed: bool = True
  divisor: float | None = None
  allows_2d_blocks = True

  @property
  def container_bits(self) -> int:
    return 8 if self.bits > 4 else (4 if self.bits > 2 else 2)

  @property
  def qmin(self) -> int:
    return -(2 ** (self.bits - 1)) if self.signed else 0

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

  def encode(self, x, reduce_axes):
    if self.signed:
      divisor = self.divisor if self.divisor is not None else float(self.qmax)
      a = base.amax(x, reduce_axes)
      s = jnp.where(a > 0, a / jnp.float32(divisor), 1.0).astype(jnp.float32)
      q = jnp.clip(jnp.round(x / s), self.qmin, self.qmax)
      return base.Encoded((q - self.qmin).astype(jnp.uint8), s)
    lo = jnp.minimum(jnp.min(x, axis=reduce_axes, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(x, axis=reduce_axes, keepdims=True), 0.0)
    s = jnp.where(hi > lo, (hi - lo) / jnp.float32(self.qmax), 1.0).astype(jnp.float32)
    z = jnp.clip(jnp.round(-lo / s), 0, self.qmax)
    q = jnp.clip(jnp.round(x / s) + z, 0, self.qmax)
    return base.Encoded(q.astype(jnp.uint8), s, z.astype(jnp.uint8))

  def decode(self, codes, scales, zero_points=None, scale2=None):
    q = codes.astype(jnp.float32)
    q = q + self.qmin if self.signed else q - zero_points.astype(jnp.float32)
    return q * scales


for _bits in (8, 4, 3, 2):
  base.register(f"int{_bits}", lambda _b=_bits, **kw: IntFormat(f"int{_b}", bits=_b, signed=True, **kw))
for _bits in (8, 4, 3):
  base.register(f"uint{_bits}", lambda _b=_bits, **kw: IntFormat(f"uint{_b}", bits=_b, signed=False, **kw))
