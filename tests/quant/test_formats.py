"""Every format's `fake_quantize` against the float64 NumPy references of `numpy_reference` (written from the
documented rules, not the library): values, scales, the grid, idempotence; random and outlier-heavy data, odd shapes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import quant
from tests.quant import numpy_reference as ref

MISMATCH_FRACTION = 2e-3
"""float32 vs float64 division may round an element that sits on a rounding tie differently: that many elements
may differ from the reference, each by at most one grid step."""


def make_data(kind, shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  if kind == "outliers":
    mask = rng.random(shape) < 0.02
    x = np.where(mask, x * rng.choice([30.0, 300.0, 3000.0], size=shape), x)
    x.reshape(-1)[: shape[-1]] = 0.0  # some blocks of zeros
  elif kind == "heavy":
    x = rng.standard_t(2, size=shape) * 1e-3
  return x.astype(np.float32)


def blocked(x, axis, group):
  """x (NumPy) with `axis` last, split into (..., K/g, g); g = K for per channel, everything for per tensor."""
  xm = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  if group == "tensor":
    return xm.reshape(1, -1)
  g = xm.shape[-1] if group == "channel" else group
  return xm.reshape(*xm.shape[:-1], -1, g)


def assert_matches(got, want, step):
  diff = np.abs(got - want)
  step = np.broadcast_to(step, diff.shape)
  bad = diff > 1e-6 * np.abs(want) + 1e-30
  assert bad.sum() <= max(2, MISMATCH_FRACTION * bad.size), f"{bad.sum()} of {bad.size} elements differ from the reference"
  assert np.all(diff[bad] <= step[bad] * 1.0001), f"differences up to {diff.max()} exceed one grid step"


def on_grid(values, grid):
  """Whether every value is (to float32 precision) one of `grid`."""
  idx = np.clip(np.searchsorted(grid, values), 1, len(grid) - 1)
  nearest = np.minimum(np.abs(values - grid[idx - 1]), np.abs(values - grid[idx]))
  return np.all(nearest <= 1e-5 * np.maximum(np.abs(values), 1.0))


def check_idempotent(x, fmt, axis, group):
  y = quant.fake_quantize(x, fmt, axis=axis, group_size=group)
  yy = quant.fake_quantize(y, fmt, axis=axis, group_size=group)
  np.testing.assert_allclose(np.asarray(yy), np.asarray(y), rtol=2e-6, atol=0)


INT_CASES = [("int8", "channel", (37, 5), 0), ("int4", 32, (96, 7), 0), ("int3", 64, (3, 5, 128), 2),
             ("int2", 128, (128, 3), 0), ("int8", "tensor", (11, 13), 1), ("int4", "channel", (3, 29, 4), 1),
             ("uint8", "channel", (37, 5), 0), ("uint4", 32, (7, 96), 1), ("uint3", "tensor", (33, 3), 0)]


@pytest.mark.parametrize("kind", ["random", "outliers", "heavy"])
@pytest.mark.parametrize("name,group,shape,axis", INT_CASES)
def test_int(name, group, shape, axis, kind):
  x = make_data(kind, shape)
  q = quant.quantize(x, name, axis=axis, group_size=group)
  y = blocked(q.dequantize(), axis, group)
  bits, signed = int(name.lstrip("uint")), not name.startswith("u")
  axes = (-1,)
  want, scale, codes = (ref.int_symmetric if signed else ref.int_asymmetric)(blocked(x, axis, group), bits, axes)
  assert_matches(y, want, scale)
  np.testing.assert_allclose(np.asarray(q.scales).reshape(-1), scale[..., 0].reshape(-1), rtol=3e-7)
  lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (-(2 ** bits - 1), 2 ** bits - 1)
  steps = y / scale
  assert np.all(np.abs(steps - np.round(steps)) < 1e-4)
  assert np.round(steps).min() >= lo and np.round(steps).max() <= hi
  check_idempotent(x, name, axis, group)


def test_int4_divisor_option():
  x = make_data("random", (64, 3))
  y = blocked(quant.fake_quantize(x, quant.get_format("int4", divisor=7.5), group_size=32), 0, 32)
  want, scale, codes = ref.int_symmetric(blocked(x, 0, 32), 4, (-1,), divisor=7.5)
  assert_matches(y, want, scale)
  assert codes.min() == -8  # the amax/7.5 convention reaches the code −8 on the negative side of a block


FP8_CASES = [("fp8_e4m3", "e4m3", "channel", (37, 5), 0), ("fp8_e5m2", "e5m2", "channel", (3, 29, 4), 1),
             ("fp8_e4m3", "e4m3", "tensor", (11, 13), 1), ("fp8_e5m2", "e5m2", 32, (96, 7), 0)]


@pytest.mark.parametrize("kind", ["random", "outliers", "heavy"])
@pytest.mark.parametrize("name,elem,group,shape,axis", FP8_CASES)
def test_fp8(name, elem, group, shape, axis, kind):
  x = make_data(kind, shape)
  q = quant.quantize(x, name, axis=axis, group_size=group)
  y = blocked(q.dequantize(), axis, group)
  want, scale, r = ref.fp8(blocked(x, axis, group), elem, (-1,))
  assert_matches(y, want, scale * ref.minifloat_spacing(r, elem))
  np.testing.assert_allclose(np.asarray(q.scales).reshape(-1), scale[..., 0].reshape(-1), rtol=3e-7)
  assert on_grid(y / scale, ref.minifloat_grid(elem))
  check_idempotent(x, name, axis, group)


def test_fp8_2d_blocks():
  x = make_data("outliers", (256, 384))
  y = np.asarray(quant.fake_quantize(x, "fp8_e4m3", axis=0, group_size=(128, 128)), np.float64)
  xb = x.astype(np.float64).T.reshape(3, 128, 2, 128)  # (out blocks, 128, in blocks, 128)
  want, scale, r = ref.fp8(xb, "e4m3", (1, 3))
  assert_matches(y.T.reshape(xb.shape), want, scale * ref.minifloat_spacing(r, "e4m3"))


MX_CASES = [("mxfp8", "e4m3", (64, 3), 0), ("mxfp6", "e2m3", (7, 96), 1), ("mxfp4", "e2m1", (3, 32, 5), 1)]


@pytest.mark.parametrize("rule", ["floor", "ceil"])
@pytest.mark.parametrize("kind", ["random", "outliers", "heavy"])
@pytest.mark.parametrize("name,elem,shape,axis", MX_CASES)
def test_mx(name, elem, shape, axis, kind, rule):
  x = make_data(kind, shape)
  fmt = quant.get_format(name, scale_rule=rule)
  q = quant.quantize(x, fmt, axis=axis)
  y = blocked(q.dequantize(), axis, 32)
  want, scale, r = ref.mx(blocked(x, axis, 32), elem, rule)
  np.testing.assert_array_equal(y, want)  # power-of-two scales: no rounding tie can differ
  np.testing.assert_array_equal(2.0 ** (np.asarray(q.scales, np.float64) - 127).reshape(-1),
                                scale[..., 0].reshape(-1))
  assert on_grid(y / scale, ref.minifloat_grid(elem))
  check_idempotent(x, fmt, axis, None)


@pytest.mark.parametrize("elem,vmax,emax", [("e4m3", 448.0, 8), ("e2m3", 7.5, 2), ("e2m1", 6.0, 2)])
def test_mx_exponent_rules_against_formulas(elem, vmax, emax):
  """Both rules on amax values at and around powers of two and element maxima, one block each."""
  amax = np.array([1.0, 2.0, 3.0, 4.0, 5.9, 6.0, 6.1, 7.5, 7.6, 448.0, 449.0, 0.7, 1e-20, 3e30])
  amax = np.concatenate([amax, np.nextafter(amax.astype(np.float32), np.float32(0)), amax * vmax])
  amax = amax.astype(np.float32).astype(np.float64)
  x = np.zeros((amax.size, 32), np.float32)
  x[:, 5] = amax
  name = {"e4m3": "mxfp8", "e2m3": "mxfp6", "e2m1": "mxfp4"}[elem]
  for rule in ("floor", "ceil"):
    q = quant.quantize(x, quant.get_format(name, scale_rule=rule), axis=1)
    got = np.asarray(q.scales, np.int64).reshape(-1) - 127
    want = (np.floor(np.log2(amax)) - emax) if rule == "floor" else np.ceil(np.log2(amax / vmax))
    np.testing.assert_array_equal(got, want, err_msg=rule)
    if rule == "ceil":  # the ceil rule never saturates: amax / 2^E ≤ max_elem, and 2^E is the smallest such
      assert np.all(amax / 2.0 ** got <= vmax) and np.all(amax / 2.0 ** (got - 1) > vmax)


@pytest.mark.parametrize("kind", ["random", "outliers", "heavy"])
@pytest.mark.parametrize("shape,axis", [((48, 5), 0), ((3, 32), 1), ((5, 3, 80), 2)])
def test_nvfp4(shape, axis, kind):
  x = make_data(kind, shape)
  q = quant.quantize(x, "nvfp4", axis=axis)
  y = blocked(q.dequantize(), axis, 16)
  want, scale, r, g = ref.nvfp4(blocked(x, axis, 16))
  assert_matches(y, want, scale * ref.minifloat_spacing(r, "e2m1"))
  assert float(q.scale2) == pytest.approx(g, rel=1e-7)
  got_scale = np.asarray(q.scales.astype(jnp.float32), np.float64).reshape(-1) * float(q.scale2)
  assert_matches(got_scale, scale[..., 0].reshape(-1), scale[..., 0].reshape(-1) / 4)
  nonzero = scale > 0
  assert on_grid(y[nonzero] / scale[nonzero], ref.minifloat_grid("e2m1")) and np.all(y[~nonzero] == 0)
  check_idempotent(x, "nvfp4", axis, None)


def test_nvfp4_zero_blocks_and_zero_tensor():
  x = make_data("random", (64, 4))
  x[:16] = 0.0
  y = np.asarray(quant.fake_quantize(x, "nvfp4"))
  assert np.all(y[:16] == 0) and np.all(np.isfinite(y))
  z = quant.quantize(np.zeros((32, 2), np.float32), "nvfp4")
  assert np.all(np.asarray(z.dequantize()) == 0) and float(z.scale2) == 1.0


@pytest.mark.parametrize("kind", ["random", "outliers", "heavy"])
@pytest.mark.parametrize("shape,axis", [((128, 3), 0), ((5, 64), 1), ((3, 192, 2), 1)])
def test_nf4(shape, axis, kind):
  x = make_data(kind, shape)
  q = quant.quantize(x, "nf4", axis=axis)
  y = blocked(q.dequantize(), axis, 64)
  want, scale, r = ref.nf4(blocked(x, axis, 64))
  assert_matches(y, want, scale * 0.25)
  np.testing.assert_allclose(np.asarray(q.scales).reshape(-1), scale[..., 0].reshape(-1), rtol=0)
  assert on_grid(y / scale, np.sort(ref.NF4))
  check_idempotent(x, "nf4", axis, None)


def test_nf4_double_quant():
  x = make_data("outliers", (256, 7))
  fmt = quant.get_format("nf4", double_quant=True)
  q = quant.quantize(x, fmt)
  xb = blocked(x, 0, 64)
  s = np.max(np.abs(xb), axis=-1).reshape(-1)  # 28 scales: one second-level block of 256
  c = np.float32(s.max() / 255)
  s_dq = np.round(s / c) * np.float64(c)
  _, _, r = ref.nf4(xb)
  y = blocked(q.dequantize(), 0, 64)
  assert_matches(y, r * s_dq.reshape(7, 4, 1), np.abs(s_dq.reshape(7, 4, 1)) * 0.25)
  assert q.scales.dtype == jnp.uint8
  check_idempotent(x, fmt, 0, None)


def test_keeps_dtype_and_shape():
  x = jnp.asarray(make_data("random", (64, 3)), jnp.bfloat16)
  for name in ("uint8", "fp8_e5m2", "nvfp4"):
    y = quant.fake_quantize(x, name)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape, name


@pytest.mark.parametrize("name,block_max,ties,want", [
    ("int8", 127.0, [0.5, 1.5, 2.5, -0.5, -3.5, 126.5], [0, 2, 2, 0, -4, 126]),
    ("fp8_e4m3", 448.0, [1.0625, 1.1875, 1.5 * 2.0 ** -9, 400.0], [1.0, 1.25, 2.0 ** -8, 384.0]),
    ("mxfp4", 6.0, [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0], [0, 1, 1, 2, 2, 4, 4, -4]),
])
def test_ties_round_to_even(name, block_max, ties, want):
  """Elements exactly halfway between grid points (scale 1 by construction) go to the even neighbour."""
  x = np.zeros((32, 1), np.float32)
  x[0, 0] = block_max
  x[1:1 + len(ties), 0] = ties
  y = np.asarray(quant.fake_quantize(x, name, axis=0, group_size=32))
  np.testing.assert_array_equal(y[1:1 + len(ties), 0], np.array(want, np.float32))
