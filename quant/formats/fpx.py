"""Parametrised low-bit floats `fp{b}_e{E}m{M}` (b = 1 + E + M, 3 ≤ b ≤ 8) and the searched `fp{b}_search`.

Element grid (E exponent bits, M mantissa bits, bias 2^(E−1) − 1, no inf or NaN codes): ±0, the subnormals
k·2^(emin−M) (k < 2^M) and the normals (1 + k/2^M)·2^e for emin ≤ e ≤ emax, with emin = 2 − 2^(E−1) and
emax = 2^(E−1); the largest value is (2 − 2^−M)·2^emax. For 4 bits: e1m2 = {0, 0.5, …, 3.5} (uniform: the int4
grid −7…7 up to a scale), e2m1 = {0, 0.5, 1, 1.5, 2, 3, 4, 6} (the OCP/NVFP4 element), e3m0 = {0, 0.25, 0.5, …,
16} (powers of two). Rounding: nearest, ties to even, saturating at ±max.

Scales: NVFP4's two-level rule at any block size (default 32). Per tensor: g = amax(x) / (max·448) (float32; 1 for
an all-zero x). Per block: b = e4m3(clip·amax_block / max / g), stored as float8_e4m3fn; elements x / (b·g)
rounded to the grid; a block whose b is 0 decodes to zeros. `clip` ≤ 1 is the clipping ratio: the block maximum
is mapped to max / clip, so values above clip·amax saturate. With a real-valued scale the exponent bias of
LLM-FP4 (Liu et al. 2023) is a power-of-two factor of the scale, so searching the bias is searching the clipping
maximum: the `clip` ratio here. `fp4_e2m1` at block 16 is exactly `nvfp4`.

`scale2` is float32 [2]: (g, E). The exponent width travels with the data, so a searched array (the format's `ebits`
is None) decodes without knowing the choice statically, and `QArray.bits_per_weight` counts it: b + 8/block +
64/tensor bits per weight (4.25 at block 32, plus 64 bits per tensor).

The 8-bit e4m3 and e5m2 grids here reach 480 and 114688 (no inf/NaN codes); the names `fp8_e4m3` and `fp8_e5m2`
stay formats/fp8.py's (build `FPFormat("...", bits=8, ebits=4)` for this one).

`fp{b}_search` (`ebits=None, clip=None`): `encode` picks, per tensor, the split E (1 … b−1) and one clip ratio
from `CLIPS` that minimise the weight's squared error (data-free). `cce_jax.quant.fp_search` does the same search
on a layer's output error ‖XW − XŴ‖² with calibration inputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cce_jax.quant.formats import base
from cce_jax.quant.formats import minifloat

BITS = (3, 4, 5, 6, 7, 8)
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)
"""The clipping ratios of the searches (1.0 first: plain absmax scaling)."""
_E4M3 = minifloat.E4M3
_E4M3_MAX = 448.0


def _i32(v):
  return jnp.asarray(v, jnp.int32)


def grid_max(ebits, mbits):
  """The largest value (2 − 2^−M)·2^(2^(E−1)) of the E/M grid (float32; E, M ints or int32 arrays)."""
  ebits, mbits = _i32(ebits), _i32(mbits)
  return jnp.ldexp(2.0 - jnp.ldexp(jnp.float32(1.0), -mbits), jnp.left_shift(1, ebits - 1))


def _emin(ebits):
  return 2 - jnp.left_shift(1, _i32(ebits) - 1)


def round_grid(v, ebits, mbits):
  """`v` (float32) rounded to the E/M grid: nearest, ties to even, saturating. E, M may be traced. float32 out."""
  mbits = _i32(mbits)
  mag = jnp.abs(v)
  _, p = jnp.frexp(mag)  # mag = m·2^p with m in [0.5, 1): floor(log2 mag) = p − 1
  e = jnp.maximum(p - 1, _emin(ebits))
  step = jnp.ldexp(jnp.float32(1.0), e - mbits)
  r = jnp.minimum(jnp.round(mag / step) * step, grid_max(ebits, mbits))
  return jnp.where(v < 0, -r, r).astype(jnp.float32)


def to_code(r, ebits, mbits):
  """uint8 codes (sign bit 1 << (E + M) above the magnitude bits) of grid values `r`."""
  ebits, mbits = _i32(ebits), _i32(mbits)
  emin = _emin(ebits)
  mag = jnp.abs(r)
  _, p = jnp.frexp(mag)
  e = jnp.maximum(p - 1, emin)
  mant = jnp.round(mag / jnp.ldexp(jnp.float32(1.0), e - mbits)).astype(jnp.int32)
  normal = jnp.left_shift(e - emin + 1, mbits) + mant - jnp.left_shift(1, mbits)
  code = jnp.where(mag < jnp.ldexp(jnp.float32(1.0), emin), mant, normal)
  sign = jnp.where(r < 0, jnp.left_shift(1, ebits + mbits), 0)
  return (code + sign).astype(jnp.uint8)


def from_code(code, ebits, mbits):
  """Grid values (float32) of codes made by `to_code`."""
  ebits, mbits = _i32(ebits), _i32(mbits)
  code = code.astype(jnp.int32)
  nbits = ebits + mbits
  sign = jnp.where(jnp.right_shift(code, nbits) & 1 == 1, -1.0, 1.0)
  mag = code & (jnp.left_shift(1, nbits) - 1)
  e_field = jnp.right_shift(mag, mbits)
  mant = mag & (jnp.left_shift(1, mbits) - 1)
  e = jnp.maximum(e_field, 1) + _emin(ebits) - 1
  frac = jnp.where(e_field == 0, mant, mant + jnp.left_shift(1, mbits)).astype(jnp.float32)
  return (sign * jnp.ldexp(frac, e - mbits)).astype(jnp.float32)


def encode_blocks(x, reduce_axes, bits: int, ebits, clip):
  """(grid values r, block scales b (float32 on the e4m3 grid), tensor scale g) of blocked x (module docstring).

  `ebits` and `clip` may be traced; `clip` broadcasts against the block maxima (a scalar, or one ratio per
  leading index). x̂ = r·b·g.
  """
  mbits = bits - 1 - _i32(ebits)
  top = grid_max(ebits, mbits)
  t = jnp.max(jnp.abs(x))
  g = jnp.where(t > 0, t / (top * jnp.float32(_E4M3_MAX)), 1.0).astype(jnp.float32)
  b = _E4M3.round(jnp.asarray(clip, jnp.float32) * base.amax(x, reduce_axes) / top / g)
  denom = b * g
  r = round_grid(jnp.where(denom > 0, x / jnp.where(denom > 0, denom, 1.0), 0.0), ebits, mbits)
  return r, b, g


def encoded(x, reduce_axes, bits: int, ebits, clip) -> base.Encoded:
  """The stored form (codes, e4m3 scales, scale2 = (g, E)) of `encode_blocks`."""
  r, b, g = encode_blocks(x, reduce_axes, bits, ebits, clip)
  scale2 = jnp.stack([g, jnp.asarray(ebits, jnp.float32)])
  return base.Encoded(to_code(r, ebits, bits - 1 - _i32(ebits)), b.astype(jnp.float8_e4m3fn), scale2=scale2)


def candidates(bits: int, splits, clips):
  """int32 [S·C] exponent widths and float32 [S·C] clip ratios, split-major (the first pair first)."""
  es = jnp.repeat(jnp.asarray(splits, jnp.int32), len(clips))
  cs = jnp.tile(jnp.asarray(clips, jnp.float32), len(splits))
  return es, cs


def default_splits(bits: int, ebits: int | None):
  """Exponent widths to search: all of 1 … bits−1 with e2 first when ebits is None, else (ebits,)."""
  if ebits is not None:
    return (ebits,)
  return tuple(sorted(range(1, bits), key=lambda e: (e != 2, e)))


@dataclasses.dataclass(frozen=True)
class FPFormat(base.Format):
  """A `bits`-bit float with `ebits` exponent bits and clipping ratio `clip`; None searches it (docstring)."""
  bits: int = 4
  ebits: int | None = 2
  clip: float | None = 1.0
  default_group = 32

  def __post_init__(self):
    if self.bits not in BITS:
      raise ValueError(f"FP format bits must be one of {BITS}, got {self.bits}")
    if self.ebits is not None and not 1 <= self.ebits <= self.bits - 1:
      raise ValueError(f"ebits must be in 1..{self.bits - 1} for {self.bits}-bit floats, got {self.ebits}")
    if self.clip is not None and not 0.0 < self.clip <= 1.0:
      raise ValueError(f"clip must be in (0, 1], got {self.clip}")

  @property
  def container_bits(self) -> int:
    return 4 if self.bits <= 4 else 8

  def encode(self, x, reduce_axes):
    if self.ebits is not None and self.clip is not None:
      return encoded(x, reduce_axes, self.bits, self.ebits, self.clip)
    splits = default_splits(self.bits, self.ebits)
    clips = CLIPS if self.clip is None else (self.clip,)
    es, cs = candidates(self.bits, splits, clips)

    def loss(ec):
      r, b, g = encode_blocks(x, reduce_axes, self.bits, ec[0], ec[1])
      return jnp.sum(jnp.square(r * b * g - x))

    i = jnp.argmin(jax.lax.map(loss, (es, cs), batch_size=_batch(x.size, len(es))))
    return encoded(x, reduce_axes, self.bits, es[i], cs[i])

  def decode(self, codes, scales, zero_points=None, scale2=None):
    ebits = scale2[..., 1].astype(jnp.int32)
    r = from_code(codes, ebits, self.bits - 1 - ebits)
    return r * (scales.astype(jnp.float32) * scale2[..., 0])


def _batch(size: int, n: int) -> int:
  """Candidates evaluated at once: about 2^25 elements of working set."""
  return max(1, min(n, (1 << 25) // max(1, size)))


def _register():
  for bits in BITS:
    for e in range(1, bits):
      name = f"fp{bits}_e{e}m{bits - 1 - e}"
      if name in base.names():  # fp8_e4m3 and fp8_e5m2 stay the IEEE-like FP8 formats (formats/fp8.py)
        continue
      base.register(name, lambda _n=name, _b=bits, _e=e, **kw: FPFormat(_n, bits=_b, ebits=_e, **kw))
    base.register(f"fp{bits}_search",
                  lambda _b=bits, **kw: FPFormat(f"fp{_b}_search", bits=_b, **{"ebits": None, "clip": None, **kw}))


_register()
