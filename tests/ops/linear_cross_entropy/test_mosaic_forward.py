"""The Mosaic GPU forward (Hopper): in the GPU interpreter on CPU (CI), compiled on an sm_90 GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.linear_cross_entropy import inputs
import cce_jax
from cce_jax import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy import keep_masks
from cce_jax.ops.linear_cross_entropy import mosaic_forward
from cce_jax.ops.linear_cross_entropy import pallas_gpu
from cce_jax.ops.linear_cross_entropy import pallas_spec
from tests.ops.linear_cross_entropy import helpers

MOSAIC = PallasGpuConfig(forward_kernel="mosaic")


def _inputs(seed, n, d, v, regime="random"):
  e, c, targets, _ = helpers.make_inputs(seed, (n,), d, v, regime=regime)
  return e.astype(jnp.bfloat16), c.astype(jnp.bfloat16), targets


def _reference_stats(e, c, targets, softcap, inv_temp):
  z = jnp.dot(e.astype(jnp.float32), c.astype(jnp.float32).T, precision="highest")
  s = (softcap * jnp.tanh(z / softcap) if softcap else z) * inv_temp
  lse = jax.nn.logsumexp(s, axis=1)
  p = jnp.exp(s - lse[:, None])
  v = s.shape[1]
  tiles = -(-v // 128)
  rmax = jnp.pad(s, ((0, 0), (0, tiles * 128 - v)), constant_values=-jnp.inf).reshape(-1, tiles, 128).max(-1)
  target = jnp.take_along_axis(s, targets[:, None], axis=1)[:, 0]
  return lse, target, s.sum(1), (p * s).sum(1), rmax


def _merge(m, l, st, ssum, w):
  m_max = m.max(0)
  scale = jnp.exp(m - m_max)
  l_sum = (l * scale).sum(0)
  return m_max + jnp.log(l_sum), st.sum(0), ssum.sum(0), (w * scale).sum(0) / l_sum


# (N, D, V, softcap, inverse temperature, splits): N not a multiple of 8 or of the 128-token tile, D chunks of
# 64, 32 and 16, V ending inside a 256-wide CTA tile or a 128-wide consumer tile or not a multiple of 8 (c is
# padded), one to several splits; softcapped logits within ±40 take the fixed-reference sums, 20 / 0.4 = 50 the
# running maximum; with and without the row maxima.
@pytest.mark.parametrize("n,d,v,softcap,inv_temp,splits,row_max", [
    (37, 64, 1003, 30.0, 1.0, 3, True),
    (130, 96, 600, None, 1 / 0.7, 1, True),
    (8, 16, 264, 2.5, 1.0, 2, False),
    (200, 128, 2056, None, 1.0, 4, False),
    (70, 32, 777, 20.0, 2.5, 2, True),
])
def test_partials_match_reference(n, d, v, softcap, inv_temp, splits, row_max):
  e, c, targets = _inputs(n + d, n, d, v)
  stats, rmax = mosaic_forward.forward_partials(
      e, c, targets, softcap=softcap, inv_temperature=inv_temp, with_sum=True, with_mean=True,
      with_row_max=row_max, splits=splits, interpret=True)
  assert all(x.shape[1] == n for x in stats)
  assert (rmax.shape == (n, -(-v // 128))) if row_max else rmax is None
  got = _merge(*stats) + ((rmax,) if row_max else ())
  for name, x, ref in zip(["lse", "target", "sum", "mean", "row max"], got,
                          _reference_stats(e, c, targets, softcap, inv_temp)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref), rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()),
                               err_msg=name)


@pytest.mark.parametrize("options", [
    dict(softcap=30.0),
    dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=-100, filter_eps=None),
    dict(exact=True, reduction="none"),
])
def test_op_through_the_mosaic_forward(options):
  """Loss and gradients of the op with the Mosaic forward against the fp32 reference: the loss within fp32
  rounding, the gradients within the naive bf16 computation's error (the op's test-base criterion)."""
  e, c, targets = _inputs(5, 61, 64, 776)
  targets = targets.at[3].set(-100)
  kw = {k: x for k, x in options.items() if k not in ("filter_eps", "exact")}
  f = lambda impl, **x: lambda e, c: jnp.sum(cce_jax.linear_cross_entropy(e, c, targets, implementation=impl,
                                                                          **kw, **x))
  out = jax.value_and_grad(f("pallas_gpu", config=MOSAIC, interpret=True,
                             **{k: options[k] for k in ("filter_eps", "exact") if k in options}),
                           argnums=(0, 1))(e, c)
  ref = jax.value_and_grad(f("reference"), argnums=(0, 1))(*helpers.upcast((e, c)))
  naive = jax.value_and_grad(f("reference"), argnums=(0, 1))(e, c)
  # The loss: fp32 math on bf16 values, which fp32 holds exactly, so the naive computation's error is 0 and the
  # kernel's is its fp32 summation order (measured ~1e-7; approx_math adds ~1e-6 on a GPU): the fp32 bound.
  assert helpers.rel_err(out[0], ref[0]) <= helpers.F32_RTOL, (out[0], ref[0])
  # The gradients: rounded to bf16 (as dZ before the GEMMs), like the naive computation's.
  for x, r, b in zip(out[1], ref[1], naive[1]):
    assert helpers.rel_err(x, r) <= helpers.LOWP_FACTOR * helpers.rel_err(b, r) + helpers.LOWP_MARGIN


@pytest.mark.parametrize("block_v", [128, 256])
def test_row_maxima_give_the_triton_keep_mask(block_v):
  """The Mosaic forward's row maxima (128 wide, grouped to block_v) give the same tile-skipping mask as the
  Triton forward's, and the same filtered gradients; on peaked inputs many tiles are skipped."""
  e, c, targets, _ = helpers.make_inputs(6, (96,), 64, 1536)
  targets = targets % 100  # targets in the first tile, hidden states near them: most tiles fall below eps
  e, c = (0.3 * e + 5.0 * c[targets]).astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  grads, masks = [], []
  for kernel in ("mosaic", "triton"):
    cfg = PallasGpuConfig(block_n=16, block_v=block_v, block_d=16, dense_backward_above=1.0, forward_kernel=kernel,
                          low_memory=False)
    spec = pallas_spec.make(None, 1.0, False, False, cfg, False, 2.0 ** -12, True)
    (lse, *_), res = pallas_gpu._stats_fwd(spec, e, c, None, targets)
    masks.append(np.asarray(keep_masks.from_row_maxima(spec, res[-1], targets, lse, jnp.ones_like(lse), 1536)))
    loss = lambda e, c: cce_jax.linear_cross_entropy(e, c, targets, implementation="pallas_gpu", config=cfg,
                                                     interpret=True)
    grads.append(jax.grad(loss, argnums=(0, 1))(e, c))
  np.testing.assert_array_equal(masks[0], masks[1])
  assert 0 < masks[0].mean() < 0.75
  for a, b in zip(grads[0], grads[1]):
    assert helpers.rel_err(a, b) < 1e-2


@pytest.mark.parametrize("make,match", [
    (lambda e, c, t: (e.astype(jnp.float32), c.astype(jnp.float32), t, None), "bf16"),
    (lambda e, c, t: (e, c, t, jnp.zeros((c.shape[0],), jnp.bfloat16)), "bias"),
    (lambda e, c, t: (e[:, :40], c[:, :40], t, None), "multiple of 16"),
])
def test_forced_mosaic_rejects_what_it_cannot_run(make, match):
  e, c, targets, bias = make(*_inputs(7, 16, 64, 264))
  with pytest.raises(ValueError, match=match):
    cce_jax.linear_cross_entropy(e, c, targets, bias=bias, implementation="pallas_gpu", config=MOSAIC,
                                 interpret=True)
  # "auto" runs the Triton forward on them instead.
  out = cce_jax.linear_cross_entropy(e, c, targets, bias=bias, implementation="pallas_gpu",
                                     config=PallasGpuConfig(), interpret=True)
  assert np.isfinite(float(out))


def test_config_rejects_unknown_forward_kernel():
  with pytest.raises(ValueError, match="forward_kernel"):
    PallasGpuConfig(forward_kernel="cuda")
  with pytest.raises(ValueError, match="approx_math"):
    PallasGpuConfig(approx_math=1)


# ---- compiled on a Hopper GPU ------------------------------------------------------------------------------------

needs_hopper = pytest.mark.skipif(not helpers.has_hopper(), reason="needs an sm_90 GPU")


def _compiled(e, c, targets, softcap, kernel, **kw):
  """Compiled loss and gradients through the given forward kernel, both with the per-row maxima (low_memory=False):
  the same keep mask, where near-uniform softmaxes make filtered gradients depend on the bound's tightness."""
  cfg = PallasGpuConfig(forward_kernel=kernel, low_memory=False)
  return helpers.pallas_value_and_grad(e, c, targets, softcap, cfg, **kw)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("n,d,v,softcap", [(1000, 2304, 33008, 30.0), (515, 4096, 5000, None), (77, 96, 50257, 5.0),
                                           (4096, 1024, 151936, None), (16, 16, 264, None)])
@pytest.mark.parametrize("filter_eps", ["auto", None])
def test_compiled_mosaic_matches_triton(n, d, v, softcap, filter_eps):
  e, c, targets = inputs.make_inputs(n, d, v, jnp.bfloat16, "peaked", seed=n)
  outs = [_compiled(e, c, targets, softcap, kernel, filter_eps=filter_eps) for kernel in ("mosaic", "triton")]
  loss, grads = outs[0][0], jax.tree.leaves(outs[0][1])
  assert abs(float(loss) - float(outs[1][0])) <= 1e-5 * abs(float(outs[1][0])) + 1e-6
  for a, b in zip(grads, jax.tree.leaves(outs[1][1])):
    assert helpers.rel_err(a, b) < 1e-2


@pytest.mark.gpu
@needs_hopper
def test_compiled_mosaic_under_vmap_and_logprobs():
  e, c, targets = inputs.make_inputs(2 * 300, 512, 4096, jnp.bfloat16, "random", seed=9)
  e, targets = e.reshape(2, 300, 512), targets.reshape(2, 300)
  f = lambda e, t: cce_jax.linear_cross_entropy(e, c, t, implementation="pallas_gpu", config=MOSAIC)
  np.testing.assert_allclose(jax.jit(jax.vmap(f))(e, targets), [f(e[0], targets[0]), f(e[1], targets[1])],
                             rtol=1e-5)
  lp = cce_jax.token_logprobs(e[0], c, targets[0], temperature=0.7, implementation="pallas_gpu", config=MOSAIC)
  ref = cce_jax.token_logprobs(*helpers.upcast((e[0], c)), targets[0], temperature=0.7, implementation="reference")
  for a, b in zip(jax.tree.leaves(lp), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3)
