"""Inputs, error measures, the float64 NumPy oracle, the naive bf16 baseline and a runner on simulated devices
shared by the loss tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import cce_jax
from cce_jax.ops.linear_cross_entropy import mosaic_pipeline

IGNORE = -100


def has_gpu() -> bool:
  """Whether JAX's default backend is a GPU (for skipif on the compiled-kernel tests)."""
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


def has_hopper() -> bool:
  """Whether the default device is an sm_90 GPU (for skipif on the compiled Mosaic GPU kernels' tests)."""
  return has_gpu() and mosaic_pipeline.is_hopper()


def pallas_value_and_grad(e, c, targets, softcap, config, **kw):
  """Jitted (loss, (dE, dC)) of the op through pallas_gpu with `config`."""
  f = lambda e, c: cce_jax.linear_cross_entropy(e, c, targets, softcap=softcap, implementation="pallas_gpu",
                                                config=config, **kw)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(e, c)


# Tolerances, written once. fp32 inputs: relative L2 error against the reference on the same inputs.
F32_RTOL = 2e-5
# 16-bit inputs: error against the fp32-upcast reference may exceed that of the naive 16-bit computation
# (materialised 16-bit logits, autodiff) by at most this factor plus an absolute margin.
LOWP_FACTOR = 1.25
LOWP_MARGIN = 2e-3


def make_inputs(seed, batch_shape, d, v, dtype=jnp.float32, *, regime="random", ignore_frac=0.0, bias=False):
  """Fresh random (e, c, targets, bias): e ~ N(0, 1), c ~ N(0, 4/D) so logits are O(2).

  regime="peaked" moves each hidden state towards its target's classifier row (a confident model).
  """
  ks = jax.random.split(jax.random.key(seed), 5)
  e = jax.random.normal(ks[0], batch_shape + (d,), jnp.float32)
  c = jax.random.normal(ks[1], (v, d), jnp.float32) * (2.0 / np.sqrt(d))
  targets = jax.random.randint(ks[2], batch_shape, 0, v)
  if regime == "peaked":
    e = 0.3 * e + 3.0 * c[targets]  # target logit ~12 above the rest
  if ignore_frac:
    targets = jnp.where(jax.random.uniform(ks[3], batch_shape) < ignore_frac, IGNORE, targets)
  b = jax.random.normal(ks[4], (v,), jnp.float32) if bias else None
  cast = lambda x: None if x is None else x.astype(dtype)
  return cast(e), cast(c), targets, cast(b)


def rel_err(x, ref):
  """||x - ref|| / ||ref|| in float64 (||x - ref|| when ref is 0)."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert np.all(np.isfinite(x)), "non-finite values"
  denom = np.linalg.norm(ref)
  return float(np.linalg.norm(x - ref) / (denom if denom > 0 else 1.0))


def upcast(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def numpy_loss(e, c, t, bias=None, softcap=None, label_smoothing=0.0, z_loss=0.0, ignore_index=IGNORE):
  """Per-token loss and LSE in float64 NumPy, straight from the definitions."""
  e, c = np.asarray(e, np.float64), np.asarray(c, np.float64)
  logits = e @ c.T + (0.0 if bias is None else np.asarray(bias, np.float64))
  if softcap is not None:
    logits = softcap * np.tanh(logits / softcap)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  v = c.shape[0]
  q = np.full(logits.shape, label_smoothing / v)
  t = np.asarray(t)
  q[np.arange(len(t)), np.where(t == ignore_index, 0, t)] += 1.0 - label_smoothing
  loss = -(q * (logits - lse[:, None])).sum(-1) + z_loss * lse**2
  return np.where(t == ignore_index, 0.0, loss), lse


def numpy_reduced_loss_and_grads(e, c, targets, *, weights=None, ignore_index=IGNORE, shift=0, reduction="mean"):
  """The op's loss and its gradients (dE, dC) in float64 NumPy, written from the definitions without the library.

  e [*B, D], c [V, D], targets [*B] int, weights [*B] or None. Position i is scored against targets[..., i + shift]
  (ignored past the end); tokens whose target is `ignore_index` count nothing. "none" gives w * loss per token
  [*B], "sum" its sum, "mean" that sum over the scored tokens' weight sum (over 1 where that sum is 0). The
  gradients are those of the scalar loss ("none": of the per-token losses' sum): per token
  coef * (softmax - onehot), with coef = w (over the mean's divisor).
  """
  e64, c64 = np.asarray(e, np.float64), np.asarray(c, np.float64)
  t = np.asarray(targets)
  batch_shape, d = e64.shape[:-1], e64.shape[-1]
  if shift:
    t = np.concatenate([t[..., shift:], np.full(t.shape[:-1] + (min(shift, t.shape[-1]),), ignore_index)], -1)
  t_n, e_nd = t.reshape(-1), e64.reshape(-1, d)
  valid = t_n != ignore_index
  w = np.ones(t_n.shape) if weights is None else np.asarray(weights, np.float64).reshape(-1)
  w = np.where(valid, w, 0.0)
  logits = e_nd @ c64.T
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  rows = np.arange(len(t_n))
  safe_t = np.where(valid, t_n, 0)
  per_token = np.where(valid, -np.log(p[rows, safe_t]), 0.0)
  divisor = 1.0
  if reduction == "mean":
    divisor = w.sum() if w.sum() != 0 else 1.0
  loss = {"none": (w * per_token).reshape(batch_shape), "sum": (w * per_token).sum(),
          "mean": (w * per_token).sum() / divisor}[reduction]
  onehot = np.zeros_like(p)
  onehot[rows, safe_t] = 1.0
  dlogits = (w / divisor)[:, None] * (p - onehot)
  return loss, (dlogits @ c64).reshape(e64.shape), dlogits.T @ e_nd


def naive_lowp_loss(e, c, targets, bias=None, *, softcap=None, label_smoothing=0.0, z_loss=0.0):
  """What one writes without care: logits materialised in the inputs' dtype, then a fp32 mean loss."""
  logits = e @ c.T
  if bias is not None:
    logits = logits + bias
  logits = logits.astype(jnp.float32)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logp = jax.nn.log_softmax(logits)
  valid = targets != IGNORE
  nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  loss = (1 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  loss = loss + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
  return jnp.sum(jnp.where(valid, loss, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_with_cpu_devices(script, devices):
  """Runs the Python `script` in a fresh process with `devices` simulated CPU devices (the repository on its path)
  and checks that it exits cleanly with OK as its last line."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def numpy_mean_loss_and_logit_grads(e, c, targets, bias=None, *, weights=None, softcap=None, label_smoothing=0.0,
                                    z_loss=0.0, ignore_index=IGNORE):
  """The op's "mean" loss with softcap, label smoothing and z-loss, in float64 NumPy from the definitions.

  e [N, D], c [V, D], targets [N] int, bias [V] or None, weights [N] or None. Per token, with s the softcapped
  logits, p = softmax(s) and q = (1 - α) onehot(t) + α / V: loss = -Σ_v q_v log p_v + z lse², weighted and
  divided by the scored tokens' weight sum (by 1 where it is 0). Returns (loss, dz, p): the scalar loss, its
  gradient [N, V] with respect to the logits z = e @ c.T + bias before the softcap (so dE = dz @ c,
  dC = dz.T @ e, dbias = dz.sum(0)), and p [N, V].
  """
  e64, c64 = np.asarray(e, np.float64), np.asarray(c, np.float64)
  t = np.asarray(targets)
  z = e64 @ c64.T + (0.0 if bias is None else np.asarray(bias, np.float64))
  s = z if softcap is None else softcap * np.tanh(z / softcap)
  lse = s.max(-1) + np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1))
  p = np.exp(s - lse[:, None])
  valid = t != ignore_index
  q = np.full(s.shape, label_smoothing / s.shape[1])
  q[np.arange(len(t)), np.where(valid, t, 0)] += 1.0 - label_smoothing
  per_token = -(q * (s - lse[:, None])).sum(-1) + z_loss * lse**2
  w = np.where(valid, 1.0 if weights is None else np.asarray(weights, np.float64), 0.0)
  divisor = w.sum() if w.sum() != 0 else 1.0
  ds = p * (1.0 + 2.0 * z_loss * lse[:, None]) - q  # q sums to 1 over the vocabulary
  dz = (w / divisor)[:, None] * ds * (1.0 if softcap is None else 1.0 - (s / softcap) ** 2)
  return (w * per_token).sum() / divisor, dz, p


def numpy_shifted_targets(targets, shift, ignore_index):
  """targets[..., i + shift] at position i, ignore_index past the end (NumPy)."""
  t = np.asarray(targets)
  if not shift:
    return t
  return np.concatenate([t[..., shift:], np.full(t.shape[:-1] + (min(shift, t.shape[-1]),), ignore_index)], -1)


def _numpy_scaled_logits(e, c, bias, softcap, temperature):
  """(s, ds/dz) [N, V] float64: s = softcap·tanh(z / softcap) / temperature of z = e @ c.T + bias."""
  z = np.asarray(e, np.float64) @ np.asarray(c, np.float64).T
  if bias is not None:
    z = z + np.asarray(bias, np.float64)
  if softcap is None:
    return z / temperature, np.full(z.shape, 1.0 / temperature)
  u = np.tanh(z / softcap)
  return softcap * u / temperature, (1.0 - u * u) / temperature


def numpy_token_logprobs(e, c, targets, *, bias=None, temperature=1.0, softcap=None, ignore_index=IGNORE, shift=0):
  """`token_logprobs` in float64 NumPy from the definitions: (log p(target), entropy), each [*B].

  e [*B, D], c [V, D], targets [*B] int, bias [V] or None; p = softmax(softcap·tanh(z / softcap) / temperature)
  with z = e @ c.T + bias. Position i is scored against targets[..., i + shift] (ignored past the end). The
  log-prob is 0 where the target is ignore_index and NaN where it lies outside [0, V) otherwise; the entropy
  -Σ p log p is that of every position's distribution, ignored or not.
  """
  d, v = np.shape(e)[-1], np.shape(c)[0]
  t = numpy_shifted_targets(targets, shift, ignore_index)
  s, _ = _numpy_scaled_logits(np.reshape(e, (-1, d)), c, bias, softcap, temperature)
  logp = s - s.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  entropy = -(np.exp(logp) * logp).sum(-1)
  t_n = t.reshape(-1)
  in_range = (t_n >= 0) & (t_n < v)
  picked = logp[np.arange(len(t_n)), np.where(in_range, t_n, 0)]
  out = np.where(t_n == ignore_index, 0.0, np.where(in_range, picked, np.nan))
  return out.reshape(t.shape), entropy.reshape(t.shape)


def numpy_token_logprobs_grads(e, c, targets, g_logp, g_entropy, *, bias=None, temperature=1.0, softcap=None,
                               ignore_index=IGNORE, shift=0):
  """Gradients (dE [*B, D], dC [V, D], dbias [V]) of Σ g_logp·logp + Σ g_entropy·entropy, the outputs of
  `numpy_token_logprobs` (targets in range or ignore_index), in float64 NumPy.

  Per position, with p = softmax(s): d logp_t / ds = onehot(t) - p (0 where ignored: the log-prob is constant
  there), d entropy / ds = -p (s - Σ p s); then dz = ds · ds/dz, dE = dz @ c, dC = dz.T @ e, dbias = Σ_n dz.
  """
  d = np.shape(e)[-1]
  e_nd, c64 = np.reshape(np.asarray(e, np.float64), (-1, d)), np.asarray(c, np.float64)
  t_n = numpy_shifted_targets(targets, shift, ignore_index).reshape(-1)
  s, dsdz = _numpy_scaled_logits(e_nd, c64, bias, softcap, temperature)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  scored = t_n != ignore_index
  onehot = np.zeros_like(p)
  onehot[np.arange(len(t_n))[scored], t_n[scored]] = 1.0
  a = np.where(scored, np.asarray(g_logp, np.float64).reshape(-1), 0.0)[:, None]
  b = np.asarray(g_entropy, np.float64).reshape(-1)[:, None]
  ds = a * (onehot - p) - b * p * (s - (p * s).sum(-1, keepdims=True))
  dz = ds * dsdz
  return (dz @ c64).reshape(np.shape(e)), dz.T @ e_nd, dz.sum(0)


def numpy_pack_codes(d_KxN, splits, per_consumer, levels):
  """The Mosaic forward's packed row codes (`mosaic_forward.forward_partials`) of d [K 128-wide tiles, N] (nats),
  from its documented contract: code = how many levels are <= d; 128-tile k = 2 (j T + t) + w of split j, consumer
  w, slot t goes to byte [j, w, t // 4, row] at bits 2 (t % 4). Returns [splits, 2, ceil(T / 4), N] int8."""
  k_tiles, n = d_KxN.shape
  code = (np.asarray(d_KxN)[..., None] >= np.asarray(levels)).sum(-1)
  packed = np.zeros((splits, 2, -(-per_consumer // 4), n), np.int64)
  for j in range(splits):
    for w in range(2):
      for t in range(per_consumer):
        k = 2 * (j * per_consumer + t) + w
        if k < k_tiles:
          packed[j, w, t // 4] |= code[k] << (2 * (t % 4))
  return jnp.asarray(packed.astype(np.uint8).view(np.int8))
