"""float64 NumPy references of the formats' documented rules, written from the docstrings (no library code).

Every function takes x already blocked as (..., block) along the last axis (or reduces over `axes`) and returns
(x̂ float64, per-element scale float64, grid values of x̂ / scale) so the tests can check values, scales and grids.
"""

from __future__ import annotations

import itertools

import numpy as np

MINIFLOATS = {"e4m3": (4, 3, 448.0), "e5m2": (5, 2, 57344.0), "e2m3": (2, 3, 7.5), "e2m1": (2, 1, 6.0)}

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32).astype(np.float64)


def minifloat_grid(name):
  """Every finite value of the element format, from its bit fields (sorted, float64)."""
  ebits, mbits, vmax = MINIFLOATS[name]
  bias = 2 ** (ebits - 1) - 1
  values = []
  for e_field, m in itertools.product(range(2 ** ebits), range(2 ** mbits)):
    v = (m / 2 ** mbits) * 2.0 ** (1 - bias) if e_field == 0 else (1 + m / 2 ** mbits) * 2.0 ** (e_field - bias)
    if v <= vmax:
      values += [v, -v]
  return np.unique(values)


def minifloat_round(v, name):
  """Nearest grid value of `v` (ties to even mantissa), saturating at ±max."""
  ebits, mbits, vmax = MINIFLOATS[name]
  emin = 2 - 2 ** (ebits - 1)
  mag = np.abs(v)
  with np.errstate(divide="ignore"):
    e = np.maximum(np.floor(np.log2(np.where(mag > 0, mag, 1.0))), emin)
  step = 2.0 ** (e - mbits)
  r = np.minimum(np.round(mag / step) * step, vmax)
  return np.sign(v) * r


def minifloat_spacing(v, name):
  """The grid spacing at |v| (an upper bound for a one-step disagreement)."""
  ebits, mbits, _ = MINIFLOATS[name]
  emin = 2 - 2 ** (ebits - 1)
  mag = np.abs(v)
  e = np.maximum(np.floor(np.log2(np.where(mag > 0, mag, 1.0))), emin)
  return 2.0 ** (e - mbits + 1)


def int_symmetric(xb, bits, axes, divisor=None):
  qmax = 2 ** (bits - 1) - 1
  divisor = qmax if divisor is None else divisor
  amax = np.max(np.abs(xb), axis=axes, keepdims=True)
  s = np.where(amax > 0, np.float32(amax / divisor), 1.0).astype(np.float64)  # stored in float32
  q = np.clip(np.round(xb / s), -qmax - 1, qmax)
  return q * s, np.broadcast_to(s, xb.shape), q


def int_asymmetric(xb, bits, axes):
  qmax = 2 ** bits - 1
  lo = np.minimum(np.min(xb, axis=axes, keepdims=True), 0)
  hi = np.maximum(np.max(xb, axis=axes, keepdims=True), 0)
  s = np.where(hi > lo, np.float32((hi - lo) / qmax), 1.0).astype(np.float64)
  z = np.clip(np.round(-lo / s), 0, qmax)
  q = np.clip(np.round(xb / s) + z, 0, qmax)
  return (q - z) * s, np.broadcast_to(s, xb.shape), q


def fp8(xb, name, axes):
  vmax = MINIFLOATS[name][2]
  amax = np.max(np.abs(xb), axis=axes, keepdims=True)
  s = np.where(amax > 0, np.float32(amax / vmax), 1.0).astype(np.float64)
  r = minifloat_round(xb / s, name)
  return r * s, np.broadcast_to(s, xb.shape), r


def mx_exponent(amax, name, rule):
  """The shared exponent: floor(log2 amax) − emax_elem, or ceil(log2(amax / max_elem)); −127 for zeros."""
  vmax = MINIFLOATS[name][2]
  with np.errstate(divide="ignore"):
    if rule == "floor":
      e = np.floor(np.log2(amax)) - np.floor(np.log2(vmax))
    else:
      e = np.ceil(np.log2(amax / vmax))
  return np.clip(np.where(amax > 0, e, -127), -127, 127)


def mx(xb, name, rule):
  e = mx_exponent(np.max(np.abs(xb), axis=-1, keepdims=True), name, rule)
  r = minifloat_round(xb / 2.0 ** e, name)
  return r * 2.0 ** e, np.broadcast_to(2.0 ** e, xb.shape), r


def nvfp4(xb):
  t = np.max(np.abs(xb))
  g = float(np.float32(t / (6 * 448))) if t > 0 else 1.0
  b = minifloat_round(np.max(np.abs(xb), axis=-1, keepdims=True) / 6 / g, "e4m3")
  scale = b * g
  r = minifloat_round(np.where(scale > 0, xb / np.where(scale > 0, scale, 1), 0), "e2m1")
  return r * scale, np.broadcast_to(scale, xb.shape), r, g


def nf4(xb):
  amax = np.max(np.abs(xb), axis=-1, keepdims=True)
  s = np.where(amax > 0, amax, 1.0)
  idx = np.argmin(np.abs((xb / s)[..., None] - NF4), axis=-1)
  return NF4[idx] * s, np.broadcast_to(s, xb.shape), NF4[idx]
