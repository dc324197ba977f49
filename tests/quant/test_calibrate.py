"""Block-by-block calibration (quant/calibrate.py, quant/calib_block.py) on a tiny decoder: the block pieces equal
the block, the accumulated Hessians equal 2XᵀX/n of explicitly captured inputs (float64 NumPy), the AWQ fold leaves
the full-precision logits unchanged, calibrated GPTQ / AWQ beat round-to-nearest, and the QArrays have RTN's layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cce_jax import models
from cce_jax import quant
from cce_jax.quant import calib_block
from cce_jax.quant import calibrate
from cce_jax.quant import recipes

CFG = models.Config(V=64, D=64, H=4, KV=4, L=2, F=128, T=32, dtype="float32", init_std=0.15)


def _model(cfg=CFG, seed=0):
  """A random decoder whose embedding channels have unequal scales (outlier channels, as trained models have)."""
  model = models.make_model(cfg, seed)
  gain = np.exp(np.random.default_rng(seed).normal(0.0, 1.0, cfg.D)).astype(np.float32)
  calibrate._write(model.embed, calibrate._read(model.embed) * gain)  # pylint: disable=protected-access
  return model


def _tokens(n, seed=1):
  return np.random.default_rng(seed).integers(0, CFG.V, n).astype(np.int32)


def _logits(model, windows):
  return np.asarray(jnp.einsum("btd,vd->btv", model(jnp.asarray(windows)), model.classifier()))


@pytest.fixture(scope="module")
def model():
  return _model()


@pytest.fixture(scope="module")
def gptq_model(model):
  return calibrate.calibrated_quantize(model, _tokens(8 * 32), "gptq", "int3", group_size=32, batch_size=4)


@pytest.fixture(scope="module")
def reference(model):
  """(the full-precision baseline on held-out windows, RTN int3 g32's mean KL)."""
  base = quant.baseline(model, _tokens(8 * 32 + 1, seed=7), seq_len=32)
  rtn = quant.quantize_model(model, recipes.decoder_rules("int3", 32))
  return base, quant.evaluate(base, rtn, base.windows)["kl_mean"]


def test_block_pieces_equal_the_block(model):
  x = model.embed_tokens(jnp.asarray(_tokens(64).reshape(2, 32)))
  pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
  out, inputs = calib_block.jitted_pieces(model.blocks[0], x, pos)
  np.testing.assert_allclose(out, model.blocks[0](x, pos), rtol=1e-5, atol=1e-6)
  assert {k: v.shape for k, v in inputs.items()} == {"qkv": (2, 32, 64), "o": (2, 32, 64), "up": (2, 32, 64),
                                                     "down": (2, 32, 128)}


def test_hessians_equal_2xtx_over_n_of_captured_inputs(model):
  windows = _tokens(6 * 32).reshape(6, 32)
  stats = calibrate.calibration_stats(model, windows, batch_size=4)  # batches of 4 and 2 windows
  pos = jnp.broadcast_to(jnp.arange(32), (6, 32))
  x = model.embed_tokens(jnp.asarray(windows))
  for k, block in enumerate(model.blocks):
    x, inputs = calib_block.block_pieces(block, x, pos)
    for name, v in inputs.items():
      v64 = np.asarray(v, np.float64).reshape(-1, v.shape[-1])
      got = stats[f"blocks/{k}/{name}"]
      assert got["count"] == v64.shape[0]
      np.testing.assert_allclose(got["hessian"], 2 * v64.T @ v64 / v64.shape[0], rtol=2e-4,
                                 atol=2e-6 * np.abs(v64).max() ** 2)
      np.testing.assert_allclose(got["act_mean"], np.abs(v64).mean(0), rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(got["act_max"], np.abs(v64).max(0), rtol=1e-6)


@pytest.mark.parametrize("kv", [4, 2])
def test_awq_fold_leaves_the_full_precision_logits_unchanged(kv):
  cfg = models.Config(V=64, D=64, H=4, KV=kv, L=2, F=128, T=32, dtype="float32", init_std=0.15)
  model = _model(cfg)
  windows = _tokens(64).reshape(2, 32)
  before = _logits(model, windows)
  copy = nnx.clone(model)
  rng = np.random.default_rng(0)
  done = []
  for block in copy.blocks:
    for name in calib_block.INPUTS:
      n = {"qkv": 64, "o": 64, "up": 64, "down": 128}[name]
      s = jnp.asarray(np.exp(rng.normal(0, 0.5, n)), jnp.float32)
      done.append(calibrate._fold(block, name, s, cfg.KV == cfg.H))  # pylint: disable=protected-access
  assert done == [True, kv == 4, True, True] * 2  # v -> o only without grouped-query attention
  assert not np.allclose(calibrate._read(copy.blocks[0].attn_norm.scale), 1.0)  # pylint: disable=protected-access
  np.testing.assert_allclose(_logits(copy, windows), before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


def test_calibrated_qarrays_have_the_rtn_layout(model, gptq_model):
  rtn = quant.quantize_model(model, recipes.decoder_rules("int3", 32))
  for k in range(CFG.L):
    for path in ("attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w1", "mlp/w3", "mlp/w2"):
      q, r = (calibrate._read(calibrate._get(m.blocks[k], path))  # pylint: disable=protected-access
              for m in (gptq_model, rtn))
      assert isinstance(q, quant.QArray) and jax.tree.structure(q) == jax.tree.structure(r), path
      assert [a.shape for a in jax.tree.leaves(q)] == [a.shape for a in jax.tree.leaves(r)], path


def test_gptq_to_2d_and_back_is_rtn_for_an_identity_hessian():
  # With H = I no error is fed forward, so GPTQ is RTN; the re-laid QArray must dequantize like quantize's.
  w = jax.random.normal(jax.random.key(0), (4, 16, 64), jnp.float32)  # wo [H, K, D]
  for g in (8, 16):
    q2 = quant.gptq(w.reshape(64, 64), jnp.eye(64), "int4", group_size=g)
    q = calibrate._to_layout(q2, w, 1, "channel" if g == 16 else g)  # pylint: disable=protected-access
    np.testing.assert_array_equal(q.dequantize(), quant.quantize(w, "int4", axis=1, group_size=g).dequantize())


def test_gptq_calibration_beats_rtn(gptq_model, reference):
  base, kl_rtn = reference  # held-out windows (another seed than the calibration tokens)
  kl_gptq = quant.evaluate(base, gptq_model, base.windows)["kl_mean"]
  assert kl_gptq < 0.8 * kl_rtn, (kl_gptq, kl_rtn)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_calibration_beats_rtn(model, reference, method):
  qmodel = calibrate.calibrated_quantize(model, _tokens(8 * 32), method, "int3", group_size=32, batch_size=8,
                                         grid=5)
  base, kl_rtn = reference
  kl_q = quant.evaluate(base, qmodel, base.windows)["kl_mean"]
  assert kl_q < 0.9 * kl_rtn, (kl_q, kl_rtn)


def test_bad_arguments_are_one_line_errors(model):
  with pytest.raises(ValueError, match="unknown calibration method 'smooth'"):
    quant.calibrated_quantize(model, _tokens(64), "smooth", "int4")
  with pytest.raises(ValueError, match="propagate must be one of"):
    calibrate.calibrated_quantize(model, _tokens(64), "gptq", "int4", propagate="none")
  with pytest.raises(ValueError, match="make no window of 32"):
    calibrate.calibrated_quantize(model, _tokens(10), "gptq", "int4")


def test_propagation_changes_only_the_later_blocks(model, gptq_model):
  full = calibrate.calibrated_quantize(model, _tokens(8 * 32), "gptq", "int3", group_size=32, batch_size=4,
                                       propagate="full")
  codes = lambda m, k: np.asarray(calibrate._read(m.blocks[k].mlp.w2).values)  # pylint: disable=protected-access
  np.testing.assert_array_equal(codes(full, 0), codes(gptq_model, 0))  # block 0 sees the embeddings either way
  assert not np.array_equal(codes(full, 1), codes(gptq_model, 1))  # block 1: quantized vs full-precision inputs
