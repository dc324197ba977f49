"""QArray as a pytree: jit, vmap, tree round trip, packing, bits per weight; the bad-input errors of `quantize`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import quant

FORMATS = ["int2", "uint4", "fp8_e4m3", "mxfp4", "nvfp4", quant.get_format("nf4", double_quant=True)]


def data(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_jit_vmap_and_tree_round_trip(name):
  x = data((4, 128, 3))
  eager = quant.quantize(x[0], name)
  jitted = jax.jit(lambda a: quant.quantize(a, name))(x[0])
  assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(eager)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(jitted)), np.asarray(eager.dequantize()))
  leaves, treedef = jax.tree_util.tree_flatten(eager)
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert again.fmt == eager.fmt and again.shape == eager.shape
  np.testing.assert_array_equal(np.asarray(again.dequantize()), np.asarray(eager.dequantize()))
  batched = jax.vmap(lambda a: quant.quantize(a, name))(x)
  deq = jax.vmap(lambda q: q.dequantize())(batched)
  for i in range(x.shape[0]):
    np.testing.assert_array_equal(np.asarray(deq[i]), np.asarray(quant.fake_quantize(x[i], name)))


@pytest.mark.parametrize("name,group,expected", [
    ("int8", None, 8 + 32 / 256), ("int4", 128, 4 + 32 / 128), ("uint4", 128, 4 + 40 / 128),
    ("int3", 64, 4 + 32 / 64), ("int2", 32, 2 + 32 / 32), ("fp8_e4m3", "tensor", 8 + 32 / 1024),
    ("mxfp8", None, 8 + 8 / 32), ("mxfp6", None, 8 + 8 / 32), ("mxfp4", None, 4 + 8 / 32),
    ("nvfp4", None, 4 + 8 / 16 + 32 / 1024), ("nf4", None, 4 + 32 / 64),
])
def test_bits_per_weight(name, group, expected):
  q = quant.quantize(data((256, 4)), name, group_size=group)
  assert q.bits_per_weight == pytest.approx(expected)


def test_bits_per_weight_nf4_double_quant():
  q = quant.quantize(data((256, 4)), quant.get_format("nf4", double_quant=True))
  assert q.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / 1024)  # 16 scales, one second-level block


def test_packing_stores_two_or_four_codes_per_byte():
  x = data((64, 3))
  assert quant.quantize(x, "int4", group_size=32).values.shape == (3, 2, 16)
  assert quant.quantize(x, "int2", group_size=32).values.shape == (3, 2, 8)
  assert quant.quantize(data((7, 3)), "uint4").values.shape == (3, 4)  # an odd axis is padded to whole bytes
  assert quant.quantize(x, "int8").values.dtype == jnp.uint8
  assert quant.quantize(x, "fp8_e5m2").values.dtype == jnp.float8_e5m2


@pytest.mark.parametrize("call,error,match", [
    (lambda: quant.quantize(data((96, 3)), "int4", group_size=64), ValueError, "group_size=64 must divide"),
    (lambda: quant.quantize(data((96, 3)), "nf4"), ValueError, "group_size=64 must divide the size 96"),
    (lambda: quant.quantize(jnp.ones((4, 4), jnp.int32), "int8"), TypeError, "floating-point array"),
    (lambda: quant.quantize(data((8, 3)).at[2, 1].set(jnp.nan), "int8"), ValueError, "NaN or Inf"),
    (lambda: quant.quantize(data((8, 3)).at[0, 0].set(jnp.inf), "fp8_e4m3"), ValueError, "NaN or Inf"),
    (lambda: quant.quantize(data((8, 3)), "int5"), ValueError, "unknown quantization format 'int5'; known.*nvfp4"),
    (lambda: quant.quantize(data((8, 3)), "int8", axis=2), ValueError, "axis=2 is out of range"),
    (lambda: quant.quantize(data((8, 3)), "int8", axis=-3), ValueError, "axis=-3 is out of range"),
    (lambda: quant.quantize(jnp.float32(1.0), "int8"), ValueError, "at least one axis"),
    (lambda: quant.quantize(data((64, 3)), "mxfp4", group_size="tensor"), ValueError, "not available for mxfp4"),
    (lambda: quant.quantize(data((64, 3)), "int8", group_size=(32, 32)), ValueError, "must divide the axes"),
    (lambda: quant.get_format("mxfp4", scale_rule="round"), ValueError, "unknown MX scale_rule"),
])
def test_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_axis_for_flax_kernels():
  """axis=0 on an [in, out] kernel puts the blocks down each output column; a transposed kernel with axis=1 agrees."""
  w = data((128, 5))
  a = quant.fake_quantize(w, "nf4", axis=0)
  b = quant.fake_quantize(w.T, "nf4", axis=1)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b).T)


def test_orbax_round_trip(tmp_path):
  """A QArray saves and restores with Orbax's StandardCheckpointer (None children and float8 leaves included)."""
  ocp = pytest.importorskip("orbax.checkpoint")
  q = quant.quantize(data((64, 3)), "nvfp4")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "q", q)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "q", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, q))
  assert isinstance(restored, quant.QArray) and restored.fmt == q.fmt
  np.testing.assert_array_equal(np.asarray(restored.dequantize()), np.asarray(q.dequantize()))
