"""The benchmark's PyTorch GPTQ layer (benchmarks/quant/gptq_torch.py) against `quant.gptq` on a small layer: the
integer codes agree (≥ 99%) and so do the reconstruction errors ‖X(W − Ŵ)‖ (within 1%). Skipped without torch."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.quant import gptq_torch
from cce_jax import quant

torch = pytest.importorskip("torch")


def _layer(k, n, t, seed):
  """(X [t, k] correlated with outlier channels ×20, W [k, n], H = 2XᵀX/t) float32 NumPy."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
  x[:, rng.choice(k, 4, replace=False)] *= 20.0
  w = rng.standard_normal((k, n))
  h = 2.0 * x.T @ x / t
  return x.astype(np.float32), w.astype(np.float32), h.astype(np.float32)


def _recon(x, w, w_hat):
  x = x.astype(np.float64)
  return float(np.linalg.norm(x @ (w - np.asarray(w_hat, np.float64))))


def _codes(q):
  k, n = q.shape
  return np.asarray(quant.qarray.unpack(q.values, q.fmt.container_bits, q.blocked_shape[-1])).reshape(n, k)


def _spec(name):
  fmt = quant.get_format(name)
  return gptq_torch.IntSpec(fmt.bits, fmt.signed, fmt.divisor)


@pytest.mark.parametrize("fmt,g,act_order,block,seed", [
    ("int4", 128, False, 128, 0), ("int3", 128, True, 128, 1), ("uint4", 64, True, 128, 2),
    ("int3", None, False, 96, 3)])
def test_torch_gptq_matches_jax(fmt, g, act_order, block, seed):
  x, w, h = _layer(k=384, n=72, t=600, seed=seed)
  q = quant.gptq(w, h, fmt, group_size=g, act_order=act_order, static_groups=act_order, block_size=block)
  codes_t, deq_t = gptq_torch.gptq(torch.from_numpy(w), torch.from_numpy(h), _spec(fmt), group_size=g,
                                   act_order=act_order, static_groups=act_order, block_size=block)
  same = np.mean(_codes(q) == codes_t.numpy())
  err, err_t = _recon(x, w, q.dequantize()), _recon(x, w, deq_t.numpy())
  assert same >= 0.99, same
  assert abs(err - err_t) <= 0.01 * err, (err, err_t)
  rtn = _recon(x, w, quant.quantize(w, fmt, axis=0, group_size=g).dequantize())
  assert err_t < 0.9 * rtn, (err_t, rtn)  # the transcription is GPTQ, not a rounding that matches by accident


@pytest.mark.parametrize("fmt,g", [("int4", 32), ("uint3", None)])
def test_torch_rtn_matches_quantize(fmt, g):
  _, w, _ = _layer(k=96, n=40, t=8, seed=4)
  q = quant.quantize(w, fmt, axis=0, group_size=g)
  codes_t, deq_t = gptq_torch.rtn(torch.from_numpy(w), _spec(fmt), g)
  np.testing.assert_array_equal(codes_t.numpy(), _codes(q))
  np.testing.assert_allclose(deq_t.numpy(), np.asarray(q.dequantize()), rtol=1e-6, atol=1e-6)
