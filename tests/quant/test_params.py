"""quantize_params / dequantize_params / size_report and the named recipes, on a tiny Decoder and plain dicts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cce_jax import quant
from cce_jax.models import Config, make_model
from cce_jax.quant import recipes

CFG = Config(V=64, D=128, H=4, KV=2, L=2, F=256, T=16, dtype="float32")  # head_dim 32: wo's groups are clipped
KERNELS = {f"blocks/{i}/{name}" for i in range(CFG.L)
           for name in ("attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w1", "mlp/w2", "mlp/w3")}
AXIS = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 0, "w3": 0}


@pytest.fixture(scope="module")
def model():
  return make_model(CFG, seed=0)


@pytest.fixture(scope="module")
def params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, quant.QArray))[0]
  return {quant.params.path_str(p): x for p, x in leaves}


def _expected_group(rule, fmt, n):
  g = fmt.default_group if rule.group_size is None else rule.group_size
  return n if rule.clip_group and isinstance(g, int) and g > n else g


@pytest.mark.parametrize("name", recipes.names())
def test_named_recipe_selects_block_kernels_and_matches_fake_quantize(params, name):
  q = quant.quantize_params(params, name)
  assert jax.tree_util.tree_structure(q, is_leaf=lambda x: isinstance(x, quant.QArray)) == \
      jax.tree_util.tree_structure(params)
  flat_q, flat_p = _flat(q), _flat(params)
  assert {p for p, x in flat_q.items() if isinstance(x, quant.QArray)} == KERNELS  # not embed, norms, head
  deq = _flat(quant.dequantize_params(q))
  rules = recipes.get(name)
  for path, x in flat_p.items():
    if path in KERNELS:
      rule = next(r for r in rules if r.matches(path))
      axis = AXIS[path.rsplit("/", 1)[1]]
      assert rule.axis == axis and flat_q[path].axis == axis
      fmt = quant.get_format(rule.format)
      ref = quant.fake_quantize(x, fmt, axis=axis, group_size=_expected_group(rule, fmt, x.shape[axis]))
      np.testing.assert_array_equal(np.asarray(deq[path]), np.asarray(ref), err_msg=path)
      assert deq[path].shape == x.shape and deq[path].dtype == x.dtype
    else:
      assert flat_q[path] is x
      np.testing.assert_array_equal(np.asarray(deq[path]), np.asarray(x))


def test_wo_blocks_stay_within_a_head(params):
  q = _flat(quant.quantize_params(params, "int4_g128"))
  wo = q["blocks/0/attn/wo"]
  hd = CFG.D // CFG.H  # g128 > head_dim: one block per (head, output), normalized to "channel" by quantize
  assert wo.axis == 1 and wo.group_size == "channel" and wo.blocked_shape == (CFG.H, CFG.D, hd)
  assert q["blocks/0/mlp/w2"].group_size == 128 and q["blocks/0/mlp/w2"].axis == 0


def test_int8_forward_close_to_full_precision(model, params):
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.V)
  ref = model(tokens)
  deq = quant.dequantize_params(quant.quantize_params(params, "int8"))
  qmodel = make_model(CFG, seed=0)
  nnx.update(qmodel, deq)
  out = qmodel(tokens)
  assert out.shape == ref.shape and bool(jnp.all(jnp.isfinite(out)))
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 1e-2, rel
  # a coarse format moves the output further than int8
  deq4 = quant.dequantize_params(quant.quantize_params(params, "int4_g128"))
  nnx.update(qmodel, deq4)
  assert float(jnp.linalg.norm(qmodel(tokens) - ref) / jnp.linalg.norm(ref)) > rel


def _plain():
  k = jax.random.split(jax.random.key(0), 3)
  return {"enc": {"dense": {"kernel": jax.random.normal(k[0], (64, 8)), "bias": jnp.zeros((8,))}},
          "layers": [{"kernel": jax.random.normal(k[1], (32, 16))}, {"kernel": jax.random.normal(k[2], (32, 4))}],
          "step": jnp.arange(3)}


def test_plain_dict_custom_rules_first_match_wins():
  p = _plain()
  rules = [(r"layers/1/kernel", None), (r".*/kernel", "int4", {"group_size": 32}),
           quant.Rule(r"enc/dense/bias", None)]
  q = _flat(quant.quantize_params(p, rules))
  assert isinstance(q["enc/dense/kernel"], quant.QArray) and q["enc/dense/kernel"].group_size == 32
  assert isinstance(q["layers/0/kernel"], quant.QArray) and q["layers/0/kernel"].group_size == "channel"
  assert q["layers/1/kernel"] is p["layers"][1]["kernel"] and q["step"] is p["step"]
  np.testing.assert_array_equal(np.asarray(quant.dequantize_params(quant.quantize_params(p, rules))
                                           ["enc"]["dense"]["kernel"]),
                                np.asarray(quant.fake_quantize(p["enc"]["dense"]["kernel"], "int4", group_size=32)))


def test_rule_axis_is_the_contraction_axis():
  x = jax.random.normal(jax.random.key(3), (32, 64))
  q = quant.quantize_params({"w": x}, [("w", "int4", {"axis": 1, "group_size": 32})])["w"]
  assert q.axis == 1
  np.testing.assert_array_equal(np.asarray(q.dequantize()),
                                np.asarray(quant.fake_quantize(x, "int4", axis=1, group_size=32)))


@pytest.mark.parametrize("tree,rules,exc,words", [
    ({"a": {"k": jnp.ones((8, 4))}}, [(r"nothing/.*", "int8")], ValueError, ["nothing/.*", "matches no"]),
    ({"a": {"k": jnp.ones((96, 4))}}, [(r"a/k", "int4", {"group_size": 128})], ValueError, ["'a/k'", "128"]),
    ({"a": {"k": jnp.ones((8, 4), jnp.int32)}}, [(r"a/k", "int8")], TypeError, ["'a/k'", "int32"]),
    ({"a": {"k": jnp.ones((8, 4)).at[3, 1].set(jnp.nan)}}, [(r"a/k", "int8")], ValueError, ["'a/k'", "NaN"]),
    ({"a": {"k": jnp.ones((8, 4)).at[0, 0].set(jnp.inf)}}, [(r"a/k", "fp8_e4m3")], ValueError, ["'a/k'", "Inf"]),
    ({"a": {"k": jnp.ones((8, 4))}}, [(r"a/k", "int5")], ValueError, ["'a/k'", "int5"]),
    ({"a": {"k": jnp.ones((8, 4))}}, [(r"a/k", "int8", {"axis": 2})], ValueError, ["'a/k'", "axis"]),
])
def test_errors_name_the_path_or_rule(tree, rules, exc, words):
  with pytest.raises(exc) as info:
    quant.quantize_params(tree, rules)
  for w in words:
    assert w in str(info.value), str(info.value)


def test_error_after_good_leaves_returns_nothing():
  tree = {"a": jnp.ones((8, 4)), "b": jnp.ones((8, 4)).at[0, 0].set(jnp.nan)}
  with pytest.raises(ValueError, match="'b'"):
    quant.quantize_params(tree, [(r"[ab]", "int8")])


def test_unknown_recipe_and_bad_regex():
  with pytest.raises(ValueError, match="int4_g128"):
    recipes.get("int7")
  with pytest.raises(ValueError, match="regex"):
    quant.Rule("(", "int8")


def test_jit_over_quantize_params(params):
  q_eager = quant.quantize_params(params, "nvfp4")
  q_jit = jax.jit(lambda p: quant.quantize_params(p, "nvfp4"))(params)
  a, b = _flat(quant.dequantize_params(q_eager)), _flat(quant.dequantize_params(q_jit))
  for path in a:
    np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=path)


def test_size_report(params):
  q = quant.quantize_params(params, "int4_g128")
  rep = quant.size_report(params, q)
  rows, tot = rep["params"], rep["total"]
  assert set(rows) == set(_flat(params)) and tot["quantized"] == len(KERNELS)
  w1 = rows["blocks/0/mlp/w1"]
  # int4 codes packed 2 per byte + one fp32 scale per 128 elements
  assert w1["before_bits"] == 32 * CFG.D * CFG.F and w1["format"] == "int4"
  assert w1["bits_per_weight"] == pytest.approx(q["blocks"][0]["mlp"]["w1"].bits_per_weight)
  assert w1["after_bytes"] == w1["after_bits"] / 8 and w1["bits_per_weight"] < 5
  assert rows["embed"]["after_bits"] == rows["embed"]["before_bits"] and rows["embed"]["format"] is None
  assert tot["before_bits"] == sum(r["before_bits"] for r in rows.values())
  assert tot["after_bits"] < tot["before_bits"]
