"""`quant.gptq` and the Hessian accumulator: reconstruction ‖XW − XŴ‖ against RTN on correlated, outlier-heavy
inputs, act-order, a float64 NumPy transcription of the algorithm, dead inputs / singular and non-PD Hessians, static
groups, and the QArray layout (the same as `quantize`'s)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import quant


def layer(k=128, n=64, t=512, seed=0, outliers=(0, 1, 2, 3)):
  """(X [t, k] correlated inputs with a few outlier channels ×20, W [k, n]), float32."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
  x = rng.standard_normal((t, k)) @ mix
  x[:, list(outliers)] *= 20.0
  w = rng.standard_normal((k, n))
  return x.astype(np.float32), w.astype(np.float32)


def hessian_of(x):
  return quant.hessian_update(quant.hessian_init(x.shape[1]), jnp.asarray(x)).hessian


def recon(x, w, q):
  return float(np.linalg.norm(x.astype(np.float64) @ (w - np.asarray(q.dequantize(), np.float64))))


# --- the float64 transcription (plain column-at-a-time updates; lazy blocks are the same arithmetic) -------------

def _np_scales(fmt, w):  # scales / zero points over the last axis, the int formats' rule (quant/formats/int.py)
  if fmt.signed:
    a = np.max(np.abs(w), axis=-1, keepdims=True)
    return np.where(a > 0, a / fmt.qmax, 1.0), np.zeros_like(a)
  lo = np.minimum(w.min(-1, keepdims=True), 0.0)
  hi = np.maximum(w.max(-1, keepdims=True), 0.0)
  s = np.where(hi > lo, (hi - lo) / fmt.qmax, 1.0)
  return s, np.clip(np.round(-lo / s), 0, fmt.qmax)


def _np_round(fmt, w, s, z):
  if fmt.signed:
    q = np.clip(np.round(w / s), fmt.qmin, fmt.qmax)
    return q - fmt.qmin, q * s
  q = np.clip(np.round(w / s) + z, 0, fmt.qmax)
  return q, (q - z) * s


def numpy_gptq(w, h, fmt, g=None, act_order=False, static_groups=False, damp=0.01):
  """Codes [N, K] (stored form) and the dequantized kernel [K, N], float64."""
  fmt = quant.get_format(fmt)
  wt = np.array(w, np.float64).T.copy()
  h = np.array(h, np.float64).copy()
  k = h.shape[0]
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  wt[:, dead] = 0.0
  if g is None:
    s_all, z_all = _np_scales(fmt, wt)
  elif static_groups:
    s_g, z_g = _np_scales(fmt, wt.reshape(wt.shape[0], k // g, g))
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
  wt, h = wt[:, perm], h[perm][:, perm]
  h += np.eye(k) * damp * np.mean(np.diag(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  codes, deq = np.zeros_like(wt), np.zeros_like(wt)
  for i in range(k):
    if g is None:
      s, z = s_all[:, 0], z_all[:, 0]
    elif static_groups:
      s, z = s_g[:, perm[i] // g, 0], z_g[:, perm[i] // g, 0]
    elif i % g == 0:
      s, z = (a[:, 0] for a in _np_scales(fmt, wt[:, i:i + g]))
    codes[:, i], deq[:, i] = _np_round(fmt, wt[:, i], s, z)
    e = (wt[:, i] - deq[:, i]) / u[i, i]
    wt[:, i:] -= np.outer(e, u[i, i:])
  inv = np.argsort(perm)
  return codes[:, inv], deq[:, inv].T


# --- tests ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,g", [("int4", 32), ("int4", 64), ("int3", None), ("int3", 32), ("uint4", 32)])
def test_gptq_beats_rtn(fmt, g):
  x, w = layer()
  q = quant.gptq(w, hessian_of(x), fmt, group_size=g, block_size=64)
  rtn = quant.quantize(w, fmt, axis=0, group_size=g)
  assert recon(x, w, q) < 0.75 * recon(x, w, rtn)


def test_act_order_not_worse():
  # seed 3; the outlier inputs sit at the end, where plain GPTQ has no later columns left to absorb their errors.
  x, w = layer(seed=3, outliers=(120, 123, 125, 127))
  h = hessian_of(x)
  plain = recon(x, w, quant.gptq(w, h, "int3"))
  ordered = recon(x, w, quant.gptq(w, h, "int3", act_order=True))
  assert ordered <= 0.7 * plain  # measured: about 0.46


@pytest.mark.parametrize("fmt,g,act_order,static_groups,block", [
    ("int4", 32, False, False, 64), ("int3", None, True, False, 48), ("uint4", 32, True, True, 128),
    ("int4", 16, False, True, 40), ("int3", None, False, False, 40)])  # the last pads 96 columns to 120
def test_matches_numpy_transcription(fmt, g, act_order, static_groups, block):
  x, w = layer(k=96, n=24, t=256, seed=1)
  x[:, 5] = 0.0  # one dead input
  h = hessian_of(x)
  q = quant.gptq(w, h, fmt, group_size=g, act_order=act_order, static_groups=static_groups, block_size=block)
  codes_ref, deq_ref = numpy_gptq(w, h, fmt, g, act_order, static_groups)
  codes = np.asarray(quant.qarray.unpack(q.values, q.fmt.container_bits, q.blocked_shape[-1])).reshape(24, 96)
  same = np.mean(codes == codes_ref)
  err, err_ref = recon(x, w, q), float(np.linalg.norm(x.astype(np.float64) @ (w - deq_ref)))
  assert same == 1.0 or abs(err - err_ref) <= 0.01 * err_ref, (same, err, err_ref)
  assert same > 0.95


def test_singular_hessian_dead_inputs():
  # Rank-deficient X (32 tokens < 64 inputs) with two inputs never active: damping makes H positive definite, the
  # dead inputs' weights are zeroed (they never reach the output), and no retry or fallback happens.
  x, w = layer(k=64, n=32, t=32, seed=2)
  x[:, [7, 40]] = 0.0
  h = hessian_of(x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    q = quant.gptq(w, h, "int4", group_size=32, name="blocks.0.mlp.up")
  deq = np.asarray(q.dequantize())
  assert np.all(np.isfinite(deq))
  np.testing.assert_array_equal(deq[[7, 40]], 0.0)
  assert recon(x, w, q) < recon(x, w, quant.quantize(w, "int4", axis=0, group_size=32))


def test_not_positive_definite_falls_back_to_rtn():
  _, w = layer(k=64, n=16)
  h = -jnp.eye(64)  # negative definite: every damping level fails
  with pytest.warns(UserWarning) as record:
    q = quant.gptq(w, h, "int4", group_size=32, name="blocks.3.attn.q", max_retries=2)
  messages = [str(r.message) for r in record]
  assert [m for m in messages if "retrying" in m] == [
      "gptq(blocks.3.attn.q): Cholesky of the damped Hessian failed at damp=0.01; retrying with damp=0.1",
      "gptq(blocks.3.attn.q): Cholesky of the damped Hessian failed at damp=0.1; retrying with damp=1"]
  assert any(m.startswith("gptq(blocks.3.attn.q): the Hessian is not positive definite even at damp=1 after 2 "
                          "retries; falling back to round-to-nearest") for m in messages)
  rtn = quant.quantize(w, "int4", axis=0, group_size=32)
  np.testing.assert_array_equal(np.asarray(q.values), np.asarray(rtn.values))
  np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(rtn.scales))


def test_retry_with_more_damping_succeeds():
  # One eigenvalue of -0.05 · mean(diag): damp 0.01 fails, damp 0.1 works.
  x, w = layer(k=64, n=16, seed=4)
  h = np.asarray(hessian_of(x), np.float64)
  vals, vecs = np.linalg.eigh(h)
  vals[0] = -0.05 * np.mean(np.diag(h))
  h = jnp.asarray((vecs * vals) @ vecs.T, jnp.float32)
  with pytest.warns(UserWarning, match="retrying with damp=0.1") as record:
    q = quant.gptq(w, h, "int4", group_size=32, name="l")
  assert not any("falling back" in str(r.message) for r in record)
  assert np.all(np.isfinite(np.asarray(q.dequantize())))
  rtn = quant.quantize(w, "int4", axis=0, group_size=32)
  assert not np.array_equal(np.asarray(q.values), np.asarray(rtn.values))


def test_under_jit_matches_eager_and_falls_back():
  x, w = layer(k=64, n=16)
  h = hessian_of(x)
  fn = jax.jit(lambda w, h: quant.gptq(w, h, "uint4", group_size=32, name="jitted"))
  eager = quant.gptq(w, h, "uint4", group_size=32)
  for a, b in zip(jax.tree_util.tree_leaves(fn(w, h)), jax.tree_util.tree_leaves(eager)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.warns(UserWarning) as record:
    q = jax.block_until_ready(fn(w, -jnp.eye(64)))
    jax.effects_barrier()
  messages = [str(r.message) for r in record]
  assert sum("retrying" in m for m in messages) == 3
  assert any(m.startswith("gptq(jitted): the Hessian is not positive definite") for m in messages)
  rtn = quant.quantize(w, "uint4", axis=0, group_size=32)
  for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(rtn)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_static_groups_use_rtn_scales_of_original_columns():
  x, w = layer()
  q = quant.gptq(w, hessian_of(x), "int4", group_size=32, act_order=True, static_groups=True)
  rtn = quant.quantize(w, "int4", axis=0, group_size=32)
  np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(rtn.scales))


@pytest.mark.parametrize("fmt,g", [("int4", 32), ("uint3", 64), ("int8", None)])
def test_qarray_layout_matches_rtn(fmt, g):
  x, w = layer(n=48)
  w16 = jnp.asarray(w, jnp.bfloat16)
  q = quant.gptq(w16, hessian_of(x), fmt, group_size=g)
  rtn = quant.quantize(w16, fmt, axis=0, group_size=g)
  assert jax.tree_util.tree_structure(q) == jax.tree_util.tree_structure(rtn)
  for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(rtn)):
    assert a.shape == b.shape and a.dtype == b.dtype
  deq = q.dequantize()
  assert deq.shape == w.shape and deq.dtype == jnp.bfloat16
  assert q.bits_per_weight == rtn.bits_per_weight


def test_hessian_running_mean_and_mask():
  rng = np.random.default_rng(5)
  batches = [rng.standard_normal((2, 7, 16)).astype(np.float32) for _ in range(3)]
  state = quant.hessian_init(16)
  for b in batches:
    state = quant.hessian_update(state, jnp.asarray(b))
  allx = np.concatenate([b.reshape(-1, 16) for b in batches]).astype(np.float64)
  np.testing.assert_allclose(np.asarray(state.hessian), 2 * allx.T @ allx / len(allx), rtol=1e-5, atol=1e-5)
  assert float(state.count) == len(allx)
  mask = np.ones((2, 7), np.float32)
  mask[1, 3:] = 0
  masked = quant.hessian_update(quant.hessian_init(16), jnp.asarray(batches[0]), jnp.asarray(mask))
  kept = batches[0][mask > 0].astype(np.float64)
  np.testing.assert_allclose(np.asarray(masked.hessian), 2 * kept.T @ kept / len(kept), rtol=1e-5, atol=1e-5)


def test_errors():
  x, w = layer(k=64, n=8)
  h = hessian_of(x)
  with pytest.raises(NotImplementedError, match="integer formats"):
    quant.gptq(w, h, "nvfp4")
  with pytest.raises(ValueError, match="static_groups=True"):
    quant.gptq(w, h, "int4", group_size=32, act_order=True)
  with pytest.raises(ValueError, match="hessian has shape"):
    quant.gptq(w, h[:8, :8], "int4")
  with pytest.raises(ValueError, match="must divide"):
    quant.gptq(w, h, "int4", group_size=48)
