"""`quant.smoothquant` over a whole decoder: the fold leaves the full-precision logits unchanged, the folded Params
equal a float64 NumPy transcription of the SmoothQuant scales, the captured activations shrink to max|x| / s, the
Param-dict form equals the model form, and bad arguments are one-line errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cce_jax import models
from cce_jax import quant
from cce_jax.quant import calibrate

CFG = models.Config(V=64, D=48, H=4, KV=2, L=2, F=80, T=24, dtype="float32", init_std=0.15)


def _model(cfg=CFG, seed=0):
  """A random decoder whose embedding channels have very unequal scales (activation outliers)."""
  model = models.make_model(cfg, seed)
  gain = np.exp(np.random.default_rng(seed).normal(0.0, 1.5, cfg.D)).astype(np.float32)
  calibrate._write(model.embed, calibrate._read(model.embed) * gain)  # pylint: disable=protected-access
  return model


def _tokens(n, seed=1):
  return np.random.default_rng(seed).integers(0, CFG.V, n).astype(np.int32)


def _logits(model, windows):
  return np.asarray(jnp.einsum("btd,vd->btv", model(jnp.asarray(windows)), model.classifier()))


def _params(model):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _scales_np(act_max, kernels, alpha):
  """The SmoothQuant formula in float64 (module docstring of quant/smoothquant.py)."""
  w_max = np.max([np.abs(w.reshape(w.shape[0], -1)).max(1) for w in kernels], axis=0)
  return np.maximum(np.maximum(act_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha), 1e-5)


@pytest.mark.parametrize("kv,inputs", [(2, ("qkv", "up", "down")), (4, ("qkv", "o", "up", "down"))])
def test_fold_leaves_the_full_precision_logits_unchanged(kv, inputs):
  model = _model(dataclasses.replace(CFG, KV=kv))
  stats = quant.calibration_stats(model, _tokens(4 * 24), batch_size=2)
  windows = _tokens(3 * 24, seed=5).reshape(3, 24)
  before = _logits(model, windows)
  smoothed = quant.smoothquant(model, stats, alpha=0.5, inputs=inputs)
  old, new = _params(model), _params(smoothed)
  ratio = new["blocks"][0]["attn_norm"]["scale"] / old["blocks"][0]["attn_norm"]["scale"]
  assert ratio.max() / ratio.min() > 10  # the fold is far from the identity
  np.testing.assert_allclose(_logits(smoothed, windows), before, rtol=1e-4, atol=2e-5 * np.abs(before).max())
  np.testing.assert_array_equal(_logits(model, windows), before)  # the argument is untouched


def test_folded_params_equal_a_float64_transcription():
  model = _model()
  stats = quant.calibration_stats(model, _tokens(4 * 24), batch_size=4)
  alpha = 0.7
  got = _params(quant.smoothquant(model, stats, alpha=alpha))
  p = _params(model)
  for k in range(CFG.L):
    b, g = p["blocks"][k], got["blocks"][k]
    a = {n: np.asarray(stats[f"blocks/{k}/{n}"]["act_max"], np.float64) for n in ("qkv", "up", "down")}
    s_qkv = _scales_np(a["qkv"], [b["attn"]["wq"], b["attn"]["wk"], b["attn"]["wv"]], alpha)
    s_up = _scales_np(a["up"], [b["mlp"]["w1"], b["mlp"]["w3"]], alpha)
    s_down = _scales_np(a["down"], [b["mlp"]["w2"]], alpha)
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5)  # pylint: disable=unnecessary-lambda-assignment
    close(g["attn_norm"]["scale"], b["attn_norm"]["scale"] / s_qkv)
    for name in ("wq", "wk", "wv"):
      close(g["attn"][name], b["attn"][name] * s_qkv[:, None, None])
    close(g["attn"]["wo"], b["attn"]["wo"])  # "o" is not smoothed by default
    close(g["mlp_norm"]["scale"], b["mlp_norm"]["scale"] / s_up)
    close(g["mlp"]["w1"], b["mlp"]["w1"] * s_up[:, None])
    close(g["mlp"]["w3"], b["mlp"]["w3"] * s_up[:, None] / s_down[None, :])
    close(g["mlp"]["w2"], b["mlp"]["w2"] * s_down[:, None])


def test_smoothed_activations_shrink_to_max_over_s():
  # Calibrating the smoothed model on the same tokens: every smoothed input's max |x| is the original's / s
  # (for alpha = 0.5: sqrt(max|x| · max|W|)), and the others are unchanged.
  model = _model()
  tokens = _tokens(4 * 24)
  stats = quant.calibration_stats(model, tokens, batch_size=4)
  smoothed = quant.smoothquant(model, stats, inputs=("qkv", "down"))
  after = quant.calibration_stats(smoothed, tokens, batch_size=4)
  p = _params(model)
  for k in range(CFG.L):
    b = p["blocks"][k]
    a_qkv = np.asarray(stats[f"blocks/{k}/qkv"]["act_max"], np.float64)
    w_max = np.max([np.abs(b["attn"][n].reshape(CFG.D, -1)).max(1) for n in ("wq", "wk", "wv")], axis=0)
    np.testing.assert_allclose(after[f"blocks/{k}/qkv"]["act_max"], np.sqrt(a_qkv * w_max), rtol=1e-4)
    a_down = np.asarray(stats[f"blocks/{k}/down"]["act_max"], np.float64)
    w2_max = np.abs(b["mlp"]["w2"]).max(1)
    np.testing.assert_allclose(after[f"blocks/{k}/down"]["act_max"], np.sqrt(a_down * w2_max), rtol=1e-4)
    np.testing.assert_allclose(after[f"blocks/{k}/up"]["act_max"], stats[f"blocks/{k}/up"]["act_max"], rtol=1e-4)


def test_param_dict_form_equals_the_model_form():
  model = _model()
  stats = quant.calibration_stats(model, _tokens(2 * 24), batch_size=2)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  wq = np.asarray(params["blocks"][0]["attn"]["wq"]).copy()
  act_max = {k: v["act_max"] for k, v in stats.items()}  # plain arrays are accepted too
  from_dict = quant.smoothquant(params, act_max, alpha=0.3)
  from_model = nnx.to_pure_dict(nnx.state(quant.smoothquant(model, stats, alpha=0.3), nnx.Param))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), from_dict, from_model)
  np.testing.assert_array_equal(params["blocks"][0]["attn"]["wq"], wq)  # the dict argument is untouched


def test_bad_arguments_are_one_line_errors():
  model = _model()
  stats = quant.calibration_stats(model, _tokens(24), batch_size=1)
  with pytest.raises(ValueError, match="act_stats has no entry 'blocks/1/up'"):
    quant.smoothquant(model, {k: v for k, v in stats.items() if k != "blocks/1/up"})
  with pytest.raises(ValueError, match="unknown input 'gate'"):
    quant.smoothquant(model, stats, inputs=("qkv", "gate"))
  with pytest.raises(ValueError, match="input 'o' folds into wv only without grouped-query attention"):
    quant.smoothquant(model, stats, inputs=("o",))
  with pytest.raises(ValueError, match="alpha must be in"):
    quant.smoothquant(model, stats, alpha=1.5)
  with pytest.raises(ValueError, match="kernels must be"):
    quant.smoothquant(model, {k: v["act_max"][:5] for k, v in stats.items()})
  with pytest.raises(ValueError, match="needs a 'blocks' entry"):
    quant.smoothquant({"embed": np.zeros((4, 4))}, stats)
