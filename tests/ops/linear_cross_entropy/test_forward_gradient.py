"""The gradient formed in the forward pass (`forward_gradient`, `mosaic_scaled_exp`): in the GPU interpreter on CPU
(CI) and compiled on an sm_90 GPU, against float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax
from cce_jax import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy import forward_gradient
from cce_jax.ops.linear_cross_entropy import mosaic_scaled_exp
from tests.ops.linear_cross_entropy import helpers

# Chunks of 128 tokens at V <= 1024 (a 256 KiB workspace): several chunks, the last one padded.
_SMALL = PallasGpuConfig(forward_gradient="mosaic", forward_gradient_bytes=128 * 1024 * 2)


def _inputs(seed, n, d, v, scale=2.0):
  e, c, t, _ = helpers.make_inputs(seed, (n,), d, v)
  t = t.at[3].set(-100)  # an ignored token
  return (scale * e).astype(jnp.bfloat16), c.astype(jnp.bfloat16), t


def _oracle(e, c, t, *, reduction, weights, **kw):
  """(loss, dE, dC) in float64 NumPy."""
  loss, dz, _ = helpers.numpy_mean_loss_and_logit_grads(e, c, t, weights=weights, **kw)
  if reduction == "sum":
    w = np.where(np.asarray(t) != -100, np.asarray(weights, np.float64), 0.0)
    loss, dz = loss * w.sum(), dz * w.sum()
  return loss, dz @ np.asarray(c, np.float64), dz.T @ np.asarray(e, np.float64)


def _loss_and_grads(e, c, t, config, **kw):
  f = lambda e, c: cce_jax.linear_cross_entropy(e, c, t, implementation="pallas_gpu", filter_eps=None,
                                                config=config, interpret=config is _SMALL, **kw)
  return jax.value_and_grad(f, argnums=(0, 1))(e, c)


# N not a multiple of 8 or of the chunk, V not a multiple of 128; the softcap's fixed reference (5) and the LSE
# estimate (none, 60); z-loss; label smoothing without a softcap; both reductions with weights.
@pytest.mark.parametrize("n,d,v,softcap,label_smoothing,z_loss,reduction", [
    (203, 64, 1003, None, 0.0, 0.0, "mean"),
    (130, 32, 520, 5.0, 0.0, 1e-3, "sum"),
    (77, 64, 300, None, 0.1, 0.0, "mean"),
    (90, 64, 1000, 60.0, 0.0, 0.0, "sum"),
])
def test_matches_float64_numpy(n, d, v, softcap, label_smoothing, z_loss, reduction):
  e, c, t = _inputs(n + v, n, d, v)
  w = jax.random.uniform(jax.random.key(n), (n,), minval=0.1)
  kw = dict(softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss)
  loss, (de, dc) = _loss_and_grads(e, c, t, _SMALL, reduction=reduction, weights=w, **kw)
  want = _oracle(e, c, t, reduction=reduction, weights=w, **kw)
  assert de.dtype == e.dtype and dc.dtype == c.dtype
  assert abs(float(loss) - want[0]) <= 1e-4 * abs(want[0])
  # bf16 X, r ⊙ e and bf16 gradients: a few 2^-9 roundings (measured ~3e-3); a wrong term is >= 1e-2.
  assert helpers.rel_err(de, want[1]) < 8e-3
  assert helpers.rel_err(dc, want[2]) < 8e-3


def test_confident_rows_keep_their_small_gradient():
  """A row with p_t ~ 1 has dZ_t = p_t - 1 ~ 1e-3: formed in fp32, not as a rounded p_t less 1."""
  n, d, v = 64, 64, 512
  e, c, t = _inputs(7, n, d, v, scale=1.0)
  t = t.at[3].set(5)
  e = (c[t].astype(jnp.float32) * 40.0).astype(jnp.bfloat16)  # each row's logit at its target dominates
  w = jnp.ones((n,))
  loss, (de, dc) = _loss_and_grads(e, c, t, _SMALL, reduction="mean", weights=w)
  _, want_de, want_dc = _oracle(e, c, t, reduction="mean", weights=w)
  assert float(loss) < 0.1
  assert helpers.rel_err(de, want_de) < 8e-3
  assert helpers.rel_err(dc, want_dc) < 8e-3


def test_overflowing_reference_falls_back_to_the_recomputing_backward(monkeypatch):
  n, d, v = 40, 32, 260
  e, c, t = _inputs(3, n, d, v)
  w = jnp.ones((n,))
  low = forward_gradient._reference
  monkeypatch.setattr(forward_gradient, "_reference", lambda *a: low(*a) - 100.0)  # exp(s - ref) overflows
  loss, (de, dc) = _loss_and_grads(e, c, t, _SMALL, reduction="mean", weights=w)
  want = _oracle(e, c, t, reduction="mean", weights=w)
  assert np.isfinite(float(loss)) and abs(float(loss) - want[0]) <= 1e-4 * abs(want[0])
  assert helpers.rel_err(de, want[1]) < 8e-3 and helpers.rel_err(dc, want[2]) < 8e-3


def test_inside_shard_map_with_the_varying_axes_check():
  """Tokens split over two CPU devices with check_vma on: the overflow `lax.cond`'s branches carry the same axes
  and the replicated classifier's gradient is summed. The recomputing branch's Pallas interpreter does not trace
  under the check, so a plain-jnp per-token loss stands in for it (the branch is traced, not taken)."""
  script = """
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, PartitionSpec as P
      import cce_jax
      from cce_jax.ops.linear_cross_entropy import forward_gradient as fg
      from tests.ops.linear_cross_entropy import helpers, test_forward_gradient as t

      def plain_losses(spec, e, c, targets, coef):
        s = (e.astype(jnp.float32) @ c.astype(jnp.float32).T)
        st = jnp.take_along_axis(s, jnp.clip(targets, 0)[:, None], 1)[:, 0]
        return jnp.where(coef != 0, jax.nn.logsumexp(s, axis=1) - st, 0.0)

      fg._token_losses = plain_losses
      mesh = Mesh(np.array(jax.devices()), ("data",))
      e, c, tg = t._inputs(5, 256, 32, 300)
      w = jnp.ones((256,))
      loss = lambda e, c, tg, w: cce_jax.linear_cross_entropy(
          e, c, tg, weights=w, reduction="sum", implementation="pallas_gpu", filter_eps=None, config=t._SMALL,
          interpret=True)
      sharded = jax.shard_map(lambda e, c, tg, w: jax.lax.psum(loss(e, c, tg, w), "data"), mesh=mesh,
                              in_specs=(P("data"), P(), P("data"), P("data")), out_specs=P(), check_vma=True)
      got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(e, c, tg, w)
      want = jax.value_and_grad(loss, argnums=(0, 1))(e, c, tg, w)
      assert abs(float(got[0]) - float(want[0])) <= 1e-5 * abs(float(want[0]))
      for a, b in zip(got[1], want[1]):  # bf16 gradients: dC is summed from two rounded halves
        assert helpers.rel_err(a, b) < 1e-2, helpers.rel_err(a, b)
      print("OK")
  """
  helpers.run_with_cpu_devices(script, 2)


def test_nan_hidden_state_of_an_ignored_token_stays_out():
  n, d, v = 40, 32, 260
  e, c, t = _inputs(4, n, d, v)
  e = e.at[3].set(jnp.nan)  # token 3 is ignored
  loss, (de, dc) = _loss_and_grads(e, c, t, _SMALL, reduction="mean", weights=jnp.ones((n,)))
  assert np.isfinite(float(loss)) and bool(jnp.all(jnp.isfinite(dc))) and bool(jnp.all(de[3] == 0))


def _check_scaled_exp(fn):
  n, d, v = 123, 64, 700
  e, c, t = _inputs(5, n, d, v)
  ref = jnp.linspace(-1.0, 3.0, n)
  live = jnp.arange(n) % 5 != 0
  x, (l, st, _) = fn(e, c, t, ref, live, softcap=None, with_sum=False, splits=2)
  z = np.asarray(e, np.float64) @ np.asarray(c, np.float64).T
  p = np.exp(z - np.asarray(ref)[:, None])
  want_x = np.where(np.asarray(live)[:, None], p, 0.0)
  rows = np.arange(n)
  valid = np.asarray(t) >= 0
  want_x[rows[valid], np.asarray(t)[valid]] = 0.0
  assert x.shape == (n, 768) and x.dtype == jnp.bfloat16 and bool(jnp.all(x[:, v:] == 0))
  assert helpers.rel_err(x[:, :v], want_x) < 4e-3
  assert helpers.rel_err(jnp.sum(l, 0), p.sum(1)) < 1e-5
  want_st = np.where(valid, z[rows, np.where(valid, np.asarray(t), 0)], 0.0)
  assert np.max(np.abs(np.asarray(jnp.sum(st, 0)) - want_st)) < 1e-4


def test_scaled_exp_reference_against_numpy():
  _check_scaled_exp(mosaic_scaled_exp.reference)


# The GPU interpreter stalls on this kernel (at some shapes even eagerly), so it is checked compiled only.
@pytest.mark.gpu
@pytest.mark.skipif(not helpers.has_hopper(), reason="needs an sm_90 GPU")
def test_scaled_exp_kernel_against_numpy():
  _check_scaled_exp(mosaic_scaled_exp.scaled_exp)


def test_mosaic_request_that_cannot_apply_is_an_error():
  e, c, t = _inputs(6, 16, 32, 256)
  with pytest.raises(ValueError, match="forward_gradient"):
    cce_jax.linear_cross_entropy(e, c, t, bias=jnp.zeros((256,)), implementation="pallas_gpu", filter_eps=None,
                                 config=_SMALL, interpret=True)
  with pytest.raises(ValueError, match="forward_gradient"):
    PallasGpuConfig(forward_gradient="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not helpers.has_hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_compiled_on_hopper(softcap):
  n, d, v = 1000, 256, 5000
  e, c, t = _inputs(8, n, d, v)
  w = jnp.ones((n,))
  cfg = PallasGpuConfig(forward_gradient="mosaic", forward_gradient_bytes=256 * 5120 * 2)
  loss, (de, dc) = _loss_and_grads(e, c, t, cfg, reduction="mean", weights=w, softcap=softcap)
  want = _oracle(e, c, t, reduction="mean", weights=w, softcap=softcap)
  assert abs(float(loss) - want[0]) <= 1e-4 * abs(want[0])
  assert helpers.rel_err(de, want[1]) < 8e-3 and helpers.rel_err(dc, want[2]) < 8e-3
  f = jax.jit(lambda e, c: _loss_and_grads(e, c, t, cfg, reduction="mean", weights=w, softcap=softcap))
  first, again = f(e, c), f(e, c)  # one compiled function repeats bitwise (the chunks run in order)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
