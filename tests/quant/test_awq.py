"""AWQ (quant/awq.py) on synthetic layers with correlated, outlier-heavy inputs, and the scale fold on a Block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cce_jax import quant
from cce_jax.models import Config
from cce_jax.models import layers
from cce_jax.quant.awq import clip_subsample, scale_search_losses


def _layer(seed=0, n=256, d=128, out=64):
  """x [n, d]: low-rank correlated channels with log-normal per-channel magnitudes (a few large outliers)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) + 0.3 * rng.standard_normal((n, d))
  x *= np.exp(1.2 * rng.standard_normal(d))
  w = 0.05 * rng.standard_normal((d, out))
  return x.astype(np.float32), w.astype(np.float32)


def _err(x, s, q, w):
  """Output MSE of (x / s) @ Q against x @ w, in float64."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  qs = [np.asarray(v.dequantize(), np.float64).reshape(w.shape[0], -1) for v in (q if isinstance(q, list) else [q])]
  xs = x / np.asarray(s, np.float64)
  return np.mean((xs @ np.concatenate(qs, axis=1) - x @ w.reshape(w.shape[0], -1)) ** 2)


@pytest.mark.parametrize("fmt", ["int4", "int3", "uint4"])
def test_awq_beats_rtn_and_clip_helps(fmt):
  x, w = _layer()
  rtn = quant.quantize(w, fmt, axis=0, group_size=32)
  e_rtn = _err(x, np.ones(w.shape[0]), rtn, w)
  s, q = quant.awq(w, x, fmt, group_size=32)
  s0, q0 = quant.awq(w, x, fmt, group_size=32, clip=False)
  e, e0 = _err(x, s, q, w), _err(x, s0, q0, w)
  assert e0 < 0.9 * e_rtn and e <= e0, (e_rtn, e0, e)
  assert q.fmt == rtn.fmt and q.group_size == rtn.group_size and q.shape == rtn.shape
  assert s.shape == (w.shape[0],) and s.dtype == jnp.float32


def test_alpha_zero_is_rtn_exactly():
  x, w = _layer(seed=1)
  s, q = quant.awq(w, x, "int4", group_size=32, grid=1, clip=False)
  rtn = quant.quantize(w, "int4", axis=0, group_size=32)
  np.testing.assert_array_equal(np.asarray(s), np.ones(w.shape[0], np.float32))
  for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(rtn)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _numpy_int4_g32(w):
  """RTN int4 (amax / 7, round half to even, clip to [-8, 7]) per group of 32 along axis 0, float64."""
  wg = w.reshape(-1, 32, w.shape[1])
  amax = np.max(np.abs(wg), axis=1, keepdims=True)
  sc = np.where(amax > 0, amax / 7.0, 1.0)
  return (np.clip(np.round(wg / sc), -8, 7) * sc).reshape(w.shape)


def test_scale_search_matches_float64_numpy_transcription():
  x, w = _layer(seed=2)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  m = np.mean(np.abs(x64), axis=0)
  ref = x64 @ w64
  losses = []
  for i in range(20):
    s = np.maximum(m ** (i / 20), 1e-4)
    s /= np.sqrt(s.max() * s.min())
    losses.append(np.mean(((x64 / s) @ _numpy_int4_g32(w64 * s[:, None]) - ref) ** 2))
  losses = np.array(losses)
  got = np.asarray(scale_search_losses(w, x, "int4", group_size=32))
  np.testing.assert_allclose(got, losses, rtol=2e-3)
  s, _ = quant.awq(w, x, "int4", group_size=32, clip=False)
  chosen = int(np.argmin(got))
  assert losses[chosen] <= losses.min() * (1 + 1e-3)
  expected = np.maximum(m ** (chosen / 20), 1e-4)
  np.testing.assert_allclose(np.asarray(s), expected / np.sqrt(expected.max() * expected.min()), rtol=1e-4)


def test_act_mean_from_a_longer_stream_is_used():
  x, w = _layer(seed=5)
  s, q = quant.awq(w, x, "int4", group_size=32)
  s1, q1 = quant.awq(w, x, "int4", group_size=32, act_mean=np.mean(np.abs(x), axis=0))
  np.testing.assert_allclose(np.asarray(s1), np.asarray(s), rtol=1e-6)
  s2, _ = quant.awq(w, x, "int4", group_size=32, grid=2, act_mean=np.ones(128, np.float32))
  np.testing.assert_array_equal(np.asarray(s2), np.ones(128, np.float32))  # m = 1: every α gives s = 1


def test_joint_kernels_share_one_scale():
  x, w = _layer(seed=3, out=96)
  wa, wb = w[:, :32], w[:, 32:].reshape(128, 2, 32)  # a [D, F] and a [D, H, K] kernel on the same input
  s, (qa, qb) = quant.awq([wa, wb], x, "int4", group_size=32)
  assert qa.shape == wa.shape and qb.shape == wb.shape
  e_rtn = _err(x, np.ones(128), [quant.quantize(v, "int4", axis=0, group_size=32) for v in (wa, wb)], w)
  assert _err(x, s, [qa, qb], w) < e_rtn


def test_awq_runs_under_jit():
  x, w = _layer(seed=4)
  s, q = jax.jit(lambda w, x: quant.awq(w, x, "int4", group_size=32))(w, x)
  s1, q1 = quant.awq(w, x, "int4", group_size=32)
  np.testing.assert_allclose(np.asarray(s), np.asarray(s1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(q1.dequantize()), rtol=1e-5, atol=1e-7)


def test_clip_subsample_is_strided_and_bounded():
  x = jnp.arange(1300 * 2, dtype=jnp.float32).reshape(1300, 2)
  sub = clip_subsample(x)
  assert sub.shape[0] <= 512
  np.testing.assert_array_equal(np.asarray(sub[:, 0]), np.arange(0, 2600, 6, dtype=np.float32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=48), "group_size=48 must divide the input size 128"),
    (dict(group_size="tensor"), "awq takes group_size None, 'channel' or an int"),
    (dict(grid=0), "grid must be a positive int"),
])
def test_bad_options(kwargs, match):
  x, w = _layer()
  with pytest.raises(ValueError, match=match):
    quant.awq(w, x, "int4", **kwargs)


def test_shape_mismatch():
  x, w = _layer()
  with pytest.raises(ValueError, match=r"x must be float \[\.\.\., 128\]"):
    quant.awq(w, x[:, :64], "int4", group_size=32)
  with pytest.raises(ValueError, match="must agree on axis 0"):
    quant.awq([w, w[:64]], x, "int4", group_size=32)
  with pytest.raises(ValueError, match="matches no trailing axes"):
    quant.fold_scale(jnp.ones((4, 6)), jnp.ones(5))


def _set(var, value):
  if hasattr(var, "set_value"):
    var.set_value(value)
  else:
    var.value = value


def test_fold_leaves_the_block_unchanged():
  cfg = Config(V=32, D=32, H=4, KV=4, L=1, F=64, T=8, dtype="float32")
  block = layers.Block(cfg, rngs=nnx.Rngs(params=0))
  rng = np.random.default_rng(0)
  _set(block.attn_norm.scale, jnp.asarray(rng.uniform(0.5, 2, cfg.D), jnp.float32))
  _set(block.mlp_norm.scale, jnp.asarray(rng.uniform(0.5, 2, cfg.D), jnp.float32))
  x = jnp.asarray(rng.standard_normal((2, cfg.T, cfg.D)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(cfg.T), (2, cfg.T))
  before = block(x, pos)
  s_attn, s_mlp = (jnp.asarray(rng.uniform(0.2, 5, cfg.D), jnp.float32) for _ in range(2))
  s_down = jnp.asarray(rng.uniform(0.2, 5, cfg.F), jnp.float32)
  s_vo = jnp.asarray(rng.uniform(0.2, 5, cfg.D), jnp.float32)  # H · K = D
  a, m = block.attn, block.mlp
  _set(block.attn_norm.scale, quant.fold_scale(block.attn_norm.scale[...], s_attn))
  for var in (a.wq, a.wk, a.wv):
    _set(var, quant.scale_input(var[...], s_attn))
  _set(block.mlp_norm.scale, quant.fold_scale(block.mlp_norm.scale[...], s_mlp))
  for var in (m.w1, m.w3):
    _set(var, quant.scale_input(var[...], s_mlp))
  _set(m.w3, quant.fold_scale(m.w3[...], s_down))
  _set(m.w2, quant.scale_input(m.w2[...], s_down))
  _set(a.wv, quant.fold_scale(a.wv[...], s_vo))
  _set(a.wo, quant.scale_input(a.wo[...], s_vo))
  after = block(x, pos)
  np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=2e-5, atol=2e-5)
  assert not np.allclose(np.asarray(a.wq[...]), np.asarray(layers.Block(cfg, rngs=nnx.Rngs(params=0)).attn.wq[...]))
