"""SmoothQuant scales and the W8A8 matmul (quant/smoothquant.py) on activations with a few huge outlier channels."""

import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import quant


def _outlier_layer(seed=0, n=256, d=128, out=96):
  """x [n, d] with 4 channels ~100x larger than the rest (systematic per-channel outliers, as in LLMs)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) * 0.3 + rng.standard_normal((n, d))
  x[:, rng.choice(d, 4, replace=False)] *= 100.0
  w = 0.05 * rng.standard_normal((d, out))
  return x.astype(np.float32), w.astype(np.float32)


def _rel_err(y, ref):
  return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


def test_scales_formula():
  rng = np.random.default_rng(1)
  a = rng.uniform(0.1, 50, 16).astype(np.float32)
  w1, w2 = (rng.standard_normal((16, 8)).astype(np.float32) for _ in range(2))
  s = np.asarray(quant.smoothquant_scales(a, [w1, w2], alpha=0.75))
  wmax = np.maximum(np.abs(w1).max(1), np.abs(w2).max(1)).astype(np.float64)
  np.testing.assert_allclose(s, a.astype(np.float64) ** 0.75 / wmax ** 0.25, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(quant.smoothquant_scales(a, w1, alpha=0.0)), 1 / np.abs(w1).max(1), rtol=1e-6)


@pytest.mark.parametrize("act", ["tensor", "token"])
def test_smoothing_cuts_w8a8_error_on_outliers(act):
  x, w = _outlier_layer()
  ref = x.astype(np.float64) @ w.astype(np.float64)
  plain = _rel_err(quant.w8a8_matmul(x, w, act=act, weight="tensor" if act == "tensor" else "channel"), ref)
  s = quant.smoothquant_scales(np.abs(x).max(0), w, alpha=0.5)
  xs = x / np.asarray(s)  # the fold into the producer; exact in full precision
  ws = quant.scale_input(w, s)
  smooth = _rel_err(quant.w8a8_matmul(xs, ws, act=act, weight="tensor" if act == "tensor" else "channel"), ref)
  np.testing.assert_allclose(xs @ np.asarray(ws), ref, rtol=1e-3, atol=1e-3)
  assert smooth < plain / 3, (plain, smooth)
  if act == "tensor":
    assert smooth < 0.02, smooth


def test_token_channel_path_is_the_int8_dot():
  x, w = _outlier_layer(seed=2, n=32)
  got = np.asarray(quant.w8a8_matmul(x.reshape(4, 8, -1), w))
  xq = quant.fake_quantize(jnp.asarray(x), "int8", axis=-1, group_size="channel")
  wq = quant.fake_quantize(jnp.asarray(w), "int8", axis=0, group_size="channel")
  np.testing.assert_allclose(got.reshape(32, -1), np.asarray(xq, np.float64) @ np.asarray(wq, np.float64),
                             rtol=1e-4, atol=1e-4)


def test_bad_inputs():
  x, w = _outlier_layer(n=8)
  with pytest.raises(ValueError, match="do not fit"):
    quant.w8a8_matmul(x[:, :64], w)
  with pytest.raises(ValueError, match="act must be 'token' or 'tensor'"):
    quant.w8a8_matmul(x, w, act="channel")
  with pytest.raises(ValueError, match=r"kernels must be \[in=128"):
    quant.smoothquant_scales(np.ones(128), w[:64])
  with pytest.raises(ValueError, match="alpha must be in"):
    quant.smoothquant_scales(np.ones(128), w, alpha=1.5)
