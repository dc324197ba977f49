"""One test base for `linear_cross_entropy` / `token_logprobs`; each backend subclasses it (see test_xla_chunked).

Most checks compare the backend with the materialised fp32 reference on fresh random inputs (test_reference checks
the reference itself against float64 NumPy); the custom ignore_index, shift, weights and reductions are also
checked against float64 NumPy written in helpers.py, which shares no code with the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import cce_jax
from tests.ops.linear_cross_entropy import helpers
from tests.ops.linear_cross_entropy.helpers import IGNORE

SHAPES = [  # (batch_shape, D, V): N=1, a scalar batch, odd V, D not a multiple of 128, leading dims.
    ((1,), 24, 7),
    ((), 33, 100),
    ((37,), 40, 1000),
    ((2, 3, 5), 130, 257),
    ((8,), 16, 50257),
    ((4, 16), 96, 1000),
]

OPTIONS = {
    "plain": {},
    "softcap": dict(softcap=2.5),
    "bias": dict(bias=True),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "weights": dict(weights=True),
    "ignore": dict(ignore_frac=0.3),
    "shift": dict(shift=1),
    "shift3_ignore": dict(shift=3, ignore_frac=0.2),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "return_lse": dict(return_lse=True),
    "all": dict(softcap=4.0, bias=True, label_smoothing=0.2, z_loss=1e-2, weights=True, ignore_frac=0.25,
                shift=1, reduction="none", return_lse=True),
    "all_mean": dict(softcap=30.0, bias=True, label_smoothing=0.05, z_loss=1e-4, weights=True,
                     ignore_frac=0.1, shift=2, return_lse=True),
}


class LinearCrossEntropyTestBase:
  """Subclasses set `implementation` and `extra` (keyword arguments such as a tile config)."""

  implementation: str = ""
  extra: dict = {}

  # ---- helpers -------------------------------------------------------------------------------------------

  def loss_fn(self, targets, *, implementation=None, reduction="mean", return_lse=False, **options):
    """A scalar objective of the differentiable inputs, and the op's raw outputs as aux."""
    impl = implementation or self.implementation
    extra = self.extra if impl == self.implementation else {}

    def objective(params):
      out = cce_jax.linear_cross_entropy(
          params["e"], params["c"], targets, bias=params.get("bias"), weights=params.get("weights"),
          reduction=reduction, return_lse=return_lse, implementation=impl, **extra, **options)
      loss, lse = out if return_lse else (out, None)
      value = jnp.sum(loss * self.cotangent(loss.shape))
      if lse is not None:
        value = value + jnp.sum(lse * self.cotangent(lse.shape, seed=8))
      return value, (loss, lse)

    return objective

  @staticmethod
  def cotangent(shape, seed=7):
    """Random output weights, so the backward is checked with unequal per-token cotangents."""
    return jax.random.uniform(jax.random.key(seed), shape, minval=0.5, maxval=1.5)

  def params(self, batch_shape, d, v, dtype=jnp.float32, *, seed=0, bias=False, weights=False,
             ignore_frac=0.0, regime="random"):
    e, c, targets, b = helpers.make_inputs(seed, batch_shape, d, v, dtype, regime=regime,
                                           ignore_frac=ignore_frac, bias=bias)
    params = {"e": e, "c": c}
    if b is not None:
      params["bias"] = b
    if weights:
      params["weights"] = jax.random.uniform(jax.random.key(seed + 1), batch_shape, minval=0.0, maxval=2.0)
    return params, targets

  def run(self, params, targets, **kw):
    fn = jax.jit(jax.value_and_grad(self.loss_fn(targets, **kw), has_aux=True))
    (value, (loss, lse)), grads = fn(params)
    return loss, lse, grads

  def assert_matches_reference(self, params, targets, rtol=helpers.F32_RTOL, **kw):
    loss, lse, grads = self.run(params, targets, **kw)
    ref_loss, ref_lse, ref_grads = self.run(helpers.upcast(params), targets, implementation="reference", **kw)
    assert helpers.rel_err(loss, ref_loss) <= rtol, (loss, ref_loss)
    if lse is not None:
      assert helpers.rel_err(lse, ref_lse) <= rtol
    for name, g in grads.items():
      assert g.dtype == params[name].dtype, (name, g.dtype)
      assert helpers.rel_err(g, ref_grads[name]) <= rtol, name
    return loss, grads

  # ---- forward and gradients against the reference ------------------------------------------------------

  @pytest.mark.parametrize("batch_shape,d,v", SHAPES)
  def test_shapes_f32(self, batch_shape, d, v):
    params, targets = self.params(batch_shape, d, v, seed=len(batch_shape) + d + v)
    self.assert_matches_reference(params, targets)

  @pytest.mark.parametrize("name", sorted(OPTIONS))
  def test_options_f32(self, name):
    opts = dict(OPTIONS[name])
    flags = {k: opts.pop(k) for k in ("bias", "weights", "ignore_frac") if k in opts}
    params, targets = self.params((3, 29), 40, 1000, seed=sorted(OPTIONS).index(name), **flags)
    loss, _ = self.assert_matches_reference(params, targets, **opts)
    assert np.all(np.isfinite(np.asarray(loss)))

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  @pytest.mark.parametrize("name,options", [
      ("plain", {}),
      ("softcap_bias", dict(softcap=30.0, bias=True)),
      ("smoothing_zloss", dict(label_smoothing=0.1, z_loss=1e-3)),
      ("peaked_ignore", dict(regime="peaked", ignore_frac=0.2)),
      ("peaked_ignore_filtered", dict(regime="peaked", ignore_frac=0.2, filter_eps="auto")),
  ])
  def test_low_precision_no_worse_than_naive(self, dtype, name, options):
    del name
    opts = dict(options)
    flags = {k: opts.pop(k) for k in ("bias", "ignore_frac", "regime") if k in opts}
    mode = {k: opts.pop(k) for k in ("filter_eps",) if k in opts}  # the op's only, not the oracles'
    params, targets = self.params((48,), 136, 3001, dtype, seed=3, **flags)
    loss, _, grads = self.run(params, targets, **opts, **mode)
    ref_loss, _, ref_grads = self.run(helpers.upcast(params), targets, implementation="reference", **opts)

    r = self.cotangent(())
    naive = lambda p: r * helpers.naive_lowp_loss(p["e"], p["c"], targets, p.get("bias"), **opts)
    naive_value, naive_grads = jax.jit(jax.value_and_grad(naive))(params)
    assert loss.dtype == jnp.float32
    for name_, (x, xr, xn) in {
        "loss": (loss, ref_loss, naive_value / r),
        **{k: (grads[k], ref_grads[k], naive_grads[k]) for k in grads},
    }.items():
      err, naive_err = helpers.rel_err(x, xr), helpers.rel_err(xn, xr)
      assert err <= helpers.LOWP_FACTOR * naive_err + helpers.LOWP_MARGIN, (name_, err, naive_err)

  def test_check_grads_f64(self):
    with jax.enable_x64(True):
      params, targets = self.params((2, 5), 6, 13, jnp.float64, seed=11, bias=True, weights=True,
                                    ignore_frac=0.2)
      for opts in (dict(softcap=3.0, label_smoothing=0.1, z_loss=0.05, shift=1),
                   dict(reduction="none", return_lse=True)):
        fn = lambda p: self.loss_fn(targets, **opts)(p)[0]
        check_grads(fn, (params,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)

  # ---- semantics -------------------------------------------------------------------------------------------

  def test_shift_equals_shifted_inputs(self):
    params, targets = self.params((2, 17), 24, 300, seed=5)
    kw = dict(implementation=self.implementation, **self.extra)
    shifted = cce_jax.linear_cross_entropy(params["e"], params["c"], targets, shift=2, reduction="none", **kw)
    manual = cce_jax.linear_cross_entropy(params["e"][:, :-2], params["c"], targets[:, 2:], reduction="none",
                                          **kw)
    np.testing.assert_allclose(shifted[:, :-2], manual, rtol=1e-6)
    np.testing.assert_array_equal(shifted[:, -2:], 0.0)

  def test_all_ignored_gives_zero_loss_and_grads(self):
    params, targets = self.params((9,), 24, 50, seed=6, weights=True)
    targets = jnp.full_like(targets, IGNORE)
    for reduction in ("mean", "sum"):
      loss, _, grads = self.run(params, targets, reduction=reduction)
      assert float(loss) == 0.0
      for g in grads.values():
        np.testing.assert_array_equal(g, 0.0)

  def test_out_of_range_targets_give_nan(self):
    params, targets = self.params((6,), 24, 50, seed=8)
    targets = targets.at[1].set(50).at[4].set(-1).at[2].set(IGNORE)
    loss, _, grads = self.run(params, targets, reduction="none")
    finite = np.isfinite(np.asarray(loss))
    np.testing.assert_array_equal(finite, [True, False, True, True, False, True])
    assert float(loss[2]) == 0.0
    mean_loss, _, mean_grads = self.run(params, targets)
    assert np.isnan(float(mean_loss))
    assert np.isnan(np.asarray(mean_grads["c"])).any()

  @pytest.mark.parametrize("where", ["e", "c"])
  @pytest.mark.parametrize("value", [np.nan, np.inf])
  def test_nan_and_inf_propagate(self, where, value):
    params, targets = self.params((5,), 24, 50, seed=9)
    params[where] = params[where].at[3, 2].set(value)
    loss, _, _ = self.run(params, targets, reduction="none")
    loss = np.asarray(loss)
    if where == "e":
      hit = np.arange(5) == 3
    elif np.isnan(value):
      hit = np.ones(5, bool)
    else:  # an infinite classifier entry makes logit 3 +inf (NaN loss) or -inf (a legitimate zero probability)
      hit = np.asarray(params["e"][:, 2]) > 0
      assert hit.any() and not hit.all()
    np.testing.assert_array_equal(np.isfinite(loss), ~hit)
    mean_loss, _, _ = self.run(params, targets)
    assert not np.isfinite(float(mean_loss))

  def test_mixed_input_dtypes(self):
    params, targets = self.params((20,), 40, 300, seed=12)
    params["e"] = params["e"].astype(jnp.bfloat16)
    loss, _, grads = self.run(params, targets, softcap=5.0)
    assert grads["e"].dtype == jnp.bfloat16 and grads["c"].dtype == jnp.float32
    ref_loss, _, ref_grads = self.run(helpers.upcast(params), targets, softcap=5.0, implementation="reference")
    assert helpers.rel_err(loss, ref_loss) <= helpers.F32_RTOL  # fp32 math on the bf16 values, which fp32 holds
    for name in ("e", "c"):  # dE rounded to bf16 (2^-9 relative)
      assert helpers.rel_err(grads[name], ref_grads[name]) < 1e-2, name

  @pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
  def test_negative_weights_match_numpy(self, reduction):
    """Weights multiply the per-token losses, negative ones too (that token's loss counts with its sign flipped);
    "mean" divides by the sum of the scored tokens' weights, negative here. Gradients against the reference."""
    params, targets = self.params((3, 11), 16, 90, seed=17, ignore_frac=0.2)
    params["weights"] = jax.random.uniform(jax.random.key(18), targets.shape, minval=-2.0, maxval=1.0)
    loss, _ = self.assert_matches_reference(params, targets, reduction=reduction)
    per_token, _ = helpers.numpy_loss(params["e"].reshape(-1, 16), params["c"], targets.reshape(-1))
    w = np.asarray(params["weights"], np.float64).reshape(-1)
    valid = np.asarray(targets).reshape(-1) != IGNORE
    assert w[valid].sum() < 0 and (w[valid] > 0).any()
    want = {"none": (w * per_token).reshape(targets.shape), "sum": (w * per_token).sum(),
            "mean": (w * per_token).sum() / w[valid].sum()}[reduction]
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)

  def test_weights_summing_to_zero_give_the_weighted_sum_as_mean(self):
    """A "mean" whose scored weights sum to 0 divides by 1: the weighted sum (0 when no token is scored)."""
    params, targets = self.params((12,), 16, 90, seed=19)
    w = np.array([1.0, -1.0, 2.0, -2.0] * 3)
    params["weights"] = jnp.asarray(w, jnp.float32)
    loss, _ = self.assert_matches_reference(params, targets)
    per_token, _ = helpers.numpy_loss(params["e"], params["c"], targets)
    np.testing.assert_allclose(loss, (w * per_token).sum(), rtol=1e-5, atol=1e-6)

  # ---- against float64 NumPy (no library code on the oracle's side) ------------------------------------------

  def loss_and_grads(self, e, c, targets, **kw):
    """This backend's (loss, (dE, dC)); the gradient is that of the loss's sum."""
    def f(e, c):
      loss = cce_jax.linear_cross_entropy(e, c, targets, implementation=self.implementation, **self.extra, **kw)
      return jnp.sum(loss), loss

    (_, loss), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(e, c)
    return loss, grads

  @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
  @pytest.mark.parametrize("ignore_at", ["zero", "last"])
  def test_custom_ignore_index_shift_small_weights_match_numpy(self, ignore_at, reduction):
    """ignore_index 0 or V - 1 (other targets in range), ignored tokens among scored ones, shift=1 and weights whose
    scored sum is below 1: loss and gradients of e and c against float64 NumPy."""
    (batch_shape, d, v), shift = ((2, 9), 20, 37), 1
    params, _ = self.params(batch_shape, d, v, seed=21)
    ignore_index = 0 if ignore_at == "zero" else v - 1
    scored = jax.random.randint(jax.random.key(22), batch_shape, 0, v - 1) + (ignore_index == 0)
    targets = scored.at[0, 2].set(ignore_index).at[0, 5].set(ignore_index).at[1, 1].set(ignore_index)
    weights = jax.random.uniform(jax.random.key(23), batch_shape, minval=0.02, maxval=0.08)
    kw = dict(weights=weights, ignore_index=ignore_index, shift=shift, reduction=reduction)
    loss, (de, dc) = self.loss_and_grads(params["e"], params["c"], targets, **kw)
    want, want_de, want_dc = helpers.numpy_reduced_loss_and_grads(params["e"], params["c"], targets, **kw)
    scored_w = np.asarray(weights)[:, :-shift][np.asarray(targets)[:, shift:] != ignore_index]
    assert 0 < scored_w.sum() < 1 and len(scored_w) < targets.size - shift * batch_shape[0]
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    assert helpers.rel_err(de, want_de) <= 1e-5 and helpers.rel_err(dc, want_dc) <= 1e-5

  def test_all_ignored_with_custom_ignore_index_match_numpy(self):
    """Every token ignored (ignore_index 0, shift=1, weights 0.1): zero loss and gradients in each reduction."""
    params, _ = self.params((2, 7), 20, 37, seed=24)
    targets = jnp.zeros((2, 7), jnp.int32)
    weights = jnp.full((2, 7), 0.1)
    for reduction in ("mean", "sum", "none"):
      kw = dict(weights=weights, ignore_index=0, shift=1, reduction=reduction)
      loss, grads = self.loss_and_grads(params["e"], params["c"], targets, **kw)
      want, *want_grads = helpers.numpy_reduced_loss_and_grads(params["e"], params["c"], targets, **kw)
      np.testing.assert_array_equal(loss, want)
      for g, wg in zip(grads, want_grads):
        np.testing.assert_array_equal(g, wg)

  # ---- filtering and exact mode -------------------------------------------------------------------------

  def test_filter_eps(self):
    params, targets = self.params((64,), 32, 2000, jnp.bfloat16, seed=13, regime="peaked")
    # Per-token losses with unequal cotangents: every filter setting runs the same (recomputing) backward. (A
    # reduced loss without filtering may form its gradient in the forward pass instead: checked last.)
    run = lambda **kw: self.run(params, targets, reduction="none", **kw)[2]
    exact, unfiltered, tiny = run(exact=True), run(filter_eps=None), run(filter_eps=1e-30)
    auto, default = run(filter_eps="auto"), run()
    # |softmax - onehot| <= 1 < 2 everywhere. A target's tile is always kept, and where most tiles are kept the
    # filtered backward falls back to the dense one, which computes (and zeroes) nothing: the targets share one
    # vocabulary tile here, so the filtered path runs, whatever the backend's tile sizes.
    everything = self.run(params, jnp.zeros_like(targets), reduction="none", filter_eps=2.0)[2]
    for g in everything.values():
      np.testing.assert_array_equal(g, 0.0)
    for k in unfiltered:
      # Not bitwise: outside exact mode a backend may accumulate with atomics in any order, and a compiler
      # may round the 16-bit d(logits) differently inside the filter's branch. A skipped tile would be far
      # above this bound.
      assert helpers.rel_err(tiny[k], unfiltered[k]) < 1e-3, k
      assert helpers.rel_err(default[k], unfiltered[k]) < 1e-3, k  # the default filters nothing
      assert helpers.rel_err(auto[k], exact[k]) < 1e-2, k
    reduced, reduced_exact = self.run(params, targets, filter_eps=None)[2], self.run(params, targets, exact=True)[2]
    for k in reduced:
      assert helpers.rel_err(reduced[k], reduced_exact[k]) < 1e-2, k

  def test_exact_is_deterministic(self):
    params, targets = self.params((3, 21), 40, 1000, jnp.bfloat16, seed=14, bias=True)
    first = self.run(params, targets, exact=True, softcap=10.0)
    second = self.run(params, targets, exact=True, softcap=10.0)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
      np.testing.assert_array_equal(a, b)

  # ---- composition ---------------------------------------------------------------------------------------

  def test_jit_eager_vmap_remat_agree(self):
    params, targets = self.params((3, 11), 24, 200, seed=15)
    kw = dict(implementation=self.implementation, softcap=5.0, **self.extra)
    fn = lambda e, c, t: cce_jax.linear_cross_entropy(e, c, t, **kw)
    eager = fn(params["e"][0], params["c"], targets[0])
    jitted = jax.jit(fn)(params["e"][0], params["c"], targets[0])
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    vmapped = jax.vmap(fn, in_axes=(0, None, 0))(params["e"], params["c"], targets)
    looped = jnp.stack([fn(params["e"][i], params["c"], targets[i]) for i in range(3)])
    np.testing.assert_allclose(vmapped, looped, rtol=1e-5)
    grad = lambda f: jax.jit(jax.grad(lambda e, c: jnp.sum(jax.vmap(f, in_axes=(0, None, 0))(e, c, targets)),
                                      argnums=(0, 1)))
    plain = grad(fn)(params["e"], params["c"])
    remat = grad(jax.checkpoint(fn))(params["e"], params["c"])
    for a, b in zip(plain, remat):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  # ---- token_logprobs ------------------------------------------------------------------------------------

  @pytest.mark.parametrize("options", [
      dict(),
      dict(temperature=0.7, softcap=5.0, bias=True),
      dict(temperature=1.3, shift=1, ignore_frac=0.2),
  ])
  def test_token_logprobs(self, options):
    opts = dict(options)
    flags = {k: opts.pop(k) for k in ("bias", "ignore_frac") if k in opts}
    params, targets = self.params((3, 13), 40, 1000, seed=16, **flags)

    def objective(impl):
      extra = self.extra if impl == self.implementation else {}

      def f(p):
        logp, ent = cce_jax.token_logprobs(p["e"], p["c"], targets, bias=p.get("bias"), return_entropy=True,
                                           implementation=impl, **extra, **opts)
        ks = jax.random.split(jax.random.key(3))
        value = jnp.sum(logp * jax.random.normal(ks[0], logp.shape))
        return value + jnp.sum(ent * jax.random.normal(ks[1], ent.shape)), (logp, ent)

      return jax.jit(jax.value_and_grad(f, has_aux=True))

    (_, (logp, ent)), grads = objective(self.implementation)(params)
    (_, (ref_logp, ref_ent)), ref_grads = objective("reference")(params)
    assert logp.shape == targets.shape and logp.dtype == jnp.float32
    assert helpers.rel_err(logp, ref_logp) <= helpers.F32_RTOL
    assert helpers.rel_err(ent, ref_ent) <= helpers.F32_RTOL
    for k in grads:
      assert helpers.rel_err(grads[k], ref_grads[k]) <= helpers.F32_RTOL, k
