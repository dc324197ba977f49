"""Inference with quantized parameters: `quantize_model`, `dot.read` / `dot.einsum`, the native W8A8 dots.

Oracles: the plain decoder run on `dequantize_params` weights (the quantized model must give the same logits); a
float64 NumPy reference of quantize-then-dot (`numpy_reference`, per-token activation and per-channel weight
scales) for the native dots; the plain `jnp.einsum` on `Param[...]` for unquantized weights (bitwise).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cce_jax import quant
from cce_jax.models import Config, make_model, param_counts
from cce_jax.quant import dot
from cce_jax.quant import recipes
from tests.quant import numpy_reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[2]

CFG = Config(V=64, D=128, H=4, KV=2, L=1, F=256, T=16, dtype="float32")  # D: a multiple of 128 (g128)
NUMPY_FP8 = {"int8": None, "fp8_e4m3": "e4m3"}


@pytest.fixture(scope="module")
def model():
  return make_model(CFG, seed=0)


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 8), 0, CFG.V)


def _logits(m, tokens):
  return jnp.einsum("btd,vd->btv", m(tokens), m.classifier(), precision="highest")


def _dequantized_model(qmodel, cfg=CFG):
  plain = make_model(cfg, seed=123)  # other weights: the update below must replace every Param
  nnx.update(plain, quant.dequantize_params(nnx.to_pure_dict(nnx.state(qmodel, nnx.Param))))
  return plain


@pytest.mark.parametrize("name", recipes.names())
def test_quantized_model_equals_dequantized_weights(model, tokens, name):
  qmodel = quant.quantize_model(model, name)
  wq = qmodel.blocks[0].attn.wq.get_value()
  assert isinstance(wq, quant.QArray) and not isinstance(qmodel.embed.get_value(), quant.QArray)
  expected = _logits(_dequantized_model(qmodel), tokens)
  np.testing.assert_allclose(np.asarray(_logits(qmodel, tokens)), np.asarray(expected), rtol=1e-6, atol=1e-6)
  jitted = nnx.jit(_logits)(qmodel, tokens)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(expected), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(expected), np.asarray(_logits(model, tokens)), rtol=1e-6, atol=1e-6)


def test_bf16_compute_and_tied_embeddings():
  cfg = Config(V=64, D=128, H=4, KV=2, L=1, F=256, T=16, dtype="bfloat16", tie_embeddings=True)
  qmodel = quant.quantize_model(make_model(cfg, seed=1), "int4_g128")
  tokens = jnp.arange(10)[None] % cfg.V
  hidden = qmodel(tokens)
  assert hidden.dtype == jnp.bfloat16 and qmodel.classifier().dtype == jnp.bfloat16
  plain = _dequantized_model(qmodel, cfg)
  np.testing.assert_array_equal(np.asarray(hidden, np.float32), np.asarray(plain(tokens), np.float32))


def test_jax_jit_over_split_state_and_original_unchanged(model, tokens):
  before = np.asarray(model(tokens))
  qmodel = quant.quantize_model(model, "nf4")
  graphdef, state = nnx.split(qmodel)
  leaves = jax.tree.leaves(state)
  assert any(leaf.dtype == jnp.uint8 for leaf in leaves)  # packed codes, not float weights, between calls
  out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(qmodel(tokens)), rtol=1e-5, atol=1e-5)
  assert all(not isinstance(leaf, quant.QArray) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  np.testing.assert_array_equal(np.asarray(model(tokens)), before)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_weights_read_bitwise_as_before(dtype):
  var = nnx.Param(jax.random.normal(jax.random.key(2), (32, 4, 8)))
  x = jax.random.normal(jax.random.key(3), (2, 5, 32)).astype(dtype)
  expected = jnp.einsum("btd,dhk->bthk", x, var[...].astype(dtype))
  np.testing.assert_array_equal(np.asarray(dot.einsum("btd,dhk->bthk", x, var, dtype=dtype), np.float32),
                                np.asarray(expected, np.float32))
  assert dot.read(var).dtype == jnp.float32 and not dot.is_native(var)


def _numpy_native(x, w, spec, fmt, w_axis):
  """float64: x quantized per token over the contracted axes, w per output channel along w_axis, then einsum."""
  ins, out = spec.split("->")
  xs, ws = ins.split(",")
  contracted = tuple(i for i, c in enumerate(xs) if c in ws)
  x, w = np.asarray(x, np.float64), np.moveaxis(np.asarray(w, np.float64), w_axis, -1)
  if fmt == "int8":
    xq, wq = ref.int_symmetric(x, 8, contracted)[0], ref.int_symmetric(w, 8, (-1,))[0]
  else:
    xq, wq = ref.fp8(x, NUMPY_FP8[fmt], contracted)[0], ref.fp8(w, NUMPY_FP8[fmt], (-1,))[0]
  wq = np.moveaxis(wq, -1, w_axis)
  return np.einsum(spec, xq, wq), np.einsum(spec, np.abs(xq), np.abs(wq))


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("spec,x_shape,w_shape,w_axis", [
    ("btd,df->btf", (2, 7, 96), (96, 40), 0),             # an MLP kernel
    ("tk,kf->tf", (13, 24), (24, 9), 0),                  # 2-D, odd sizes
    ("btd,dhk->bthk", (3, 5, 64), (64, 3, 6), 0),         # wq
    ("bthk,hkd->btd", (2, 5, 4, 16), (4, 16, 48), 1),     # wo: per-head scales, summed after rescaling
])
def test_native_einsum_matches_numpy(fmt, spec, x_shape, w_shape, w_axis):
  kx, kw = jax.random.split(jax.random.key(sum(x_shape) + len(fmt)))
  x = jax.random.normal(kx, x_shape) * jnp.exp(jax.random.normal(kx, x_shape[-1:]))  # outlier channels
  w = jax.random.normal(kw, w_shape) * 0.05
  q = quant.quantize(w, fmt, axis=w_axis)
  eqns = jax.make_jaxpr(lambda x, q: dot.native_einsum(spec, x, q))(x, q).jaxpr.eqns
  (dot_eqn,) = [e for e in eqns if e.primitive.name == "dot_general"]
  operand = jnp.int8 if fmt == "int8" else jnp.float8_e4m3fn
  assert [v.aval.dtype for v in dot_eqn.invars] == [operand, operand]
  y = jax.jit(lambda x, q: dot.native_einsum(spec, x, q))(x, q)
  expected, magnitude = _numpy_native(x, w, spec, fmt, w_axis)
  assert y.dtype == jnp.float32 and y.shape == expected.shape
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - expected), 1e-5 * magnitude + 1e-30)


def test_native_dots_model_close_and_jittable(model, tokens):
  expected = _logits(model, tokens)
  for fmt in ("int8", "fp8_e4m3"):
    qmodel = quant.quantize_model(model, fmt, native_dots=True)
    assert qmodel.blocks[0].mlp.w2.get_metadata()["native_dot"] and dot.is_native(qmodel.blocks[0].mlp.w2)
    eager, jitted = _logits(qmodel, tokens), nnx.jit(_logits)(qmodel, tokens)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    weight_only = _logits(quant.quantize_model(model, fmt), tokens)
    rel = float(jnp.linalg.norm(eager - expected) / jnp.linalg.norm(expected))
    assert 0 < rel < 0.05, (fmt, rel)
    assert not np.allclose(np.asarray(eager), np.asarray(weight_only))  # activations are quantized too


def test_model_size_report(model):
  report = quant.model_size_report(model, quant.quantize_model(model, "int8"))
  total, row = report["total"], report["params"]["blocks/0/mlp/w1"]
  assert total["quantized"] == 7 * CFG.L and total["after_bytes"] < total["before_bytes"]
  assert row["before_bytes"] == CFG.D * CFG.F * 4 and row["after_bytes"] == CFG.D * CFG.F + CFG.F * 4
  assert report["params"]["embed"]["after_bytes"] == report["params"]["embed"]["before_bytes"]
  assert param_counts(quant.quantize_model(model, "nf4")) == param_counts(model)


def test_errors(model):
  with pytest.raises(ValueError, match=r"rule 'nothing/\.\*' -> int8 matches no parameter path"):
    quant.quantize_model(model, [("nothing/.*", "int8")])
  with pytest.raises(ValueError, match=r"parameter 'blocks/0/.*native dots take int8 or fp8_e4m3.*got int4"):
    quant.quantize_model(model, "int4_g128", native_dots=True)
  with pytest.raises(ValueError, match="group_size=128"):
    dot.native_einsum("td,df->tf", jnp.ones((2, 256)), quant.quantize(jnp.ones((256, 8)), "int8", group_size=128))
  q = quant.quantize(jnp.ones((16, 8)), "int8")
  with pytest.raises(ValueError, match="explicit two-operand spec"):
    dot.native_einsum("...d,df", jnp.ones((2, 16)), q)
  with pytest.raises(ValueError, match="quantization axis 0 .'d'. is not contracted"):
    dot.native_einsum("tf,df->td", jnp.ones((2, 8)), q)


def test_native_dots_probe_runs_small(tmp_path):
  """The probe as a script in its own process (its absl flags would clash with other scripts' in one process)."""
  out = tmp_path / "rows.json"
  subprocess.run([sys.executable, "-m", "benchmarks.quant.native_dots", "--small", "--repeats=1", f"--out={out}"],
                 cwd=ROOT, check=True, capture_output=True, text=True)
  rows = {r["method"]: r for r in json.loads(out.read_text())["rows"] if r["shape"] == "64x128x128"}
  assert set(rows) == {"bf16", "deq_int8", "deq_int4_g128", "deq_fp8", "w8a8_int8", "gemm_int8", "w8a8_fp8",
                       "gemm_fp8"}
  assert rows["deq_int8"]["rel_err"] < 2e-2 and rows["w8a8_fp8"]["rel_err"] < 0.1 and rows["bf16"]["gemm"] != "-"
  assert rows["deq_int4_g128"]["weight_mb"] < rows["deq_int8"]["weight_mb"] < rows["bf16"]["weight_mb"]
  if jax.default_backend() == "cpu":  # XLA:CPU keeps s8 operands on its dot (and upcasts fp8)
    assert rows["gemm_int8"]["eight_bit_gemm"] and not rows["bf16"]["eight_bit_gemm"]
