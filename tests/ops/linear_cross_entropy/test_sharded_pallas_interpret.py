"""The vocabulary split with the Pallas kernels (`cce_jax.sharded`, vocab_axes, implementation="pallas_gpu",
interpret=True) over two simulated CPU devices, against float64 NumPy (`helpers`, no library code): the loss with
label smoothing (whose uniform part spans the whole vocabulary, not one device's rows), z-loss, softcap, bias and
weights, the gradients of e, c and bias, with gradient filtering off and on; token_logprobs and its gradient.

Each test runs in a fresh process with two CPU devices. The Pallas interpreter does not trace under shard_map's
check_vma=True (its dynamic slices mix varying data with program ids; see test_shard_map), so `sharded` turns the
check off with interpret=True; compiled on GPUs the kernels run with the checks on
(test_sharded.test_pallas_gpu_vocabulary_split_over_the_local_gpus).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import cce_jax
from cce_jax import PallasGpuConfig
from tests.ops.linear_cross_entropy import helpers

# N, D and each device's 72 rows cross tile edges; dense_backward_above=1.0: a filtered backward always runs the
# tile-skipping kernels (low_memory does not take a vocabulary split).
N, D, V = 40, 24, 144
_CONFIG = PallasGpuConfig(block_n=16, block_v=32, block_d=16, grad_block_n=16, grad_block_d=16, num_warps=4,
                          num_stages=1, num_splits=1, dense_backward_above=1.0, low_memory=False)
# fp32 kernels against float64: summation order and fp32 rounding only (measured ~4e-7 relative).
_RTOL = helpers.F32_RTOL

_SCRIPT = """
    from tests.ops.linear_cross_entropy import test_sharded_pallas_interpret as t
    t.{check}()
    print("OK")
"""


def _mesh():
  assert len(jax.devices()) == 2, jax.devices()
  return Mesh(np.array(jax.devices()), ("model",))


def _inputs(seed, regime="random"):
  """e [N, D], c [V, D], bias [V], fp32; targets [N] on both devices' rows, some ignored; weights [N]."""
  e, c, targets, bias = helpers.make_inputs(seed, (N,), D, V, regime=regime, ignore_frac=0.15, bias=True)
  weights = jax.random.uniform(jax.random.key(seed + 100), (N,), jnp.float32, 0.5, 1.5)
  t = np.asarray(targets)
  assert (t[t >= 0] < V // 2).any() and (t >= V // 2).any()
  return e, c, targets, bias, weights


def _split_loss_and_grads(e, c, targets, bias, weights, **options):
  """The split op's mean loss and its gradients (dE, dC, dbias)."""
  mesh = _mesh()
  f = lambda e, c, b: cce_jax.sharded.linear_cross_entropy(
      e, c, targets, bias=b, weights=weights, mesh=mesh, vocab_axes="model", implementation="pallas_gpu",
      interpret=True, config=_CONFIG, **options)
  loss, (de, dc, db) = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(e, c, bias)
  assert len({s.index for s in dc.addressable_shards}) == 2, dc.sharding  # dC stays split over the devices
  return loss, (de, dc, db)


def _numpy_grads(dz, e, c):
  """(dE, dC, dbias) from the gradient dz [N, V] of the logits."""
  e64, c64 = np.asarray(e, np.float64), np.asarray(c, np.float64)
  return dz @ c64, dz.T @ e64, dz.sum(0)


def _check_unfiltered():
  for seed, options in ((0, dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)),
                        (1, dict(label_smoothing=0.3)), (2, dict(z_loss=1e-2, softcap=5.0))):
    e, c, targets, bias, weights = _inputs(seed)
    loss, grads = _split_loss_and_grads(e, c, targets, bias, weights, filter_eps=None, **options)
    want, dz, _ = helpers.numpy_mean_loss_and_logit_grads(e, c, targets, bias, weights=weights, **options)
    np.testing.assert_allclose(loss, want, rtol=_RTOL, err_msg=str(options))
    for name, g, w in zip(("dE", "dC", "dbias"), grads, _numpy_grads(dz, e, c)):
      assert helpers.rel_err(g, w) < _RTOL, (name, options, helpers.rel_err(g, w))


def _check_filtered():
  """filter_eps: only entries with |softmax - onehot| < filter_eps (the paper's criterion, over the whole
  vocabulary) may be left out of the gradients, so each entry of dE, dC and dbias is within the sum of those
  entries' own terms of the exact float64 gradient; and here some are left out."""
  eps = 1e-2
  e, c, targets, bias, weights = _inputs(3, regime="peaked")
  loss, grads = _split_loss_and_grads(e, c, targets, bias, weights, filter_eps=eps, softcap=20.0)
  want, dz, p = helpers.numpy_mean_loss_and_logit_grads(e, c, targets, bias, weights=weights, softcap=20.0)
  np.testing.assert_allclose(loss, want, rtol=_RTOL)  # the forward is not filtered
  t = np.asarray(targets)
  onehot = np.zeros_like(p)
  onehot[np.arange(N), np.where(t >= 0, t, 0)] = 1.0
  droppable = np.abs(dz) * (np.abs(p - onehot) < eps)
  slack = _numpy_grads(droppable, np.abs(np.asarray(e)), np.abs(np.asarray(c)))
  left_out = 0.0
  for name, g, w, s in zip(("dE", "dC", "dbias"), grads, _numpy_grads(dz, e, c), slack):
    err = np.abs(np.asarray(g, np.float64) - w)
    noise = _RTOL * np.abs(w).max()
    assert (err <= s + noise).all(), (name, (err - s).max(), noise)
    left_out = max(left_out, err.max() / noise)
  assert left_out > 100, left_out  # the filter left out some tiles: the test covers the tile-skipping backward


def _check_logprobs():
  """log p(target) and the entropy of softmax(softcap(z) / T), and the gradient of Σ log p(target)."""
  e, c, targets, bias, _ = _inputs(4)
  targets = jnp.where(targets < 0, 0, targets)
  mesh, temperature, cap = _mesh(), 0.7, 10.0
  f = lambda e, c, b: cce_jax.sharded.token_logprobs(
      e, c, targets, bias=b, mesh=mesh, vocab_axes="model", return_entropy=True, softcap=cap,
      temperature=temperature, implementation="pallas_gpu", interpret=True, config=_CONFIG)
  logp, entropy = jax.jit(f)(e, c, bias)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0]), argnums=(0, 1, 2)))(e, c, bias)

  z = np.asarray(e, np.float64) @ np.asarray(c, np.float64).T + np.asarray(bias, np.float64)
  s = cap * np.tanh(z / cap) / temperature
  logp_all = s - s.max(-1, keepdims=True)
  logp_all -= np.log(np.exp(logp_all).sum(-1, keepdims=True))
  p, t = np.exp(logp_all), np.asarray(targets)
  np.testing.assert_allclose(logp, logp_all[np.arange(N), t], rtol=_RTOL, atol=1e-5)
  np.testing.assert_allclose(entropy, -(p * logp_all).sum(-1), rtol=_RTOL, atol=1e-5)
  onehot = np.zeros_like(p)
  onehot[np.arange(N), t] = 1.0
  dz = (onehot - p) / temperature * (1.0 - (cap * np.tanh(z / cap) / cap) ** 2)
  for name, g, w in zip(("dE", "dC", "dbias"), grads, _numpy_grads(dz, e, c)):
    assert helpers.rel_err(g, w) < _RTOL, (name, helpers.rel_err(g, w))


def test_label_smoothing_z_loss_and_gradients_unfiltered():
  helpers.run_with_cpu_devices(_SCRIPT.format(check="_check_unfiltered"), 2)


def test_filtered_gradients_leave_out_only_entries_below_filter_eps():
  helpers.run_with_cpu_devices(_SCRIPT.format(check="_check_filtered"), 2)


def test_token_logprobs_and_gradient():
  helpers.run_with_cpu_devices(_SCRIPT.format(check="_check_logprobs"), 2)


def _check_forward_gradient_batch_split():
  """The gradient formed in the forward pass (`forward_gradient`; its kernel's jnp twin in interpret mode) with
  the tokens split over the devices: each device's dC share is summed over the mesh, the mean over all tokens."""
  e, c, targets, _ = helpers.make_inputs(5, (N,), 32, V, ignore_frac=0.15)  # the kernel needs D % 16 == 0
  weights = jax.random.uniform(jax.random.key(105), (N,), jnp.float32, 0.5, 1.5)
  e, c = (2.0 * e).astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  config = PallasGpuConfig(forward_gradient="mosaic", forward_gradient_bytes=128 * 256 * 2)
  for options in (dict(), dict(softcap=5.0, z_loss=1e-3), dict(label_smoothing=0.1)):
    f = lambda e, c: cce_jax.sharded.linear_cross_entropy(
        e, c, targets, weights=weights, mesh=_mesh(), batch_axes="model", implementation="pallas_gpu",
        interpret=True, config=config, filter_eps=None, **options)
    loss, (de, dc) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(e, c)
    want, dz, _ = helpers.numpy_mean_loss_and_logit_grads(e, c, targets, weights=weights, **options)
    np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=str(options))
    for name, g, w in zip(("dE", "dC"), (de, dc), _numpy_grads(dz, e, c)[:2]):
      # bf16 X and gradients: a few 2^-9 roundings (measured ~2e-3); a device's lost share is >= 0.3
      assert helpers.rel_err(g, w) < 8e-3, (name, options, helpers.rel_err(g, w))


def test_forward_gradient_with_the_tokens_split():
  helpers.run_with_cpu_devices(_SCRIPT.format(check="_check_forward_gradient_batch_split"), 2)
