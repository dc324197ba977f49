"""The decoder: shapes and dtypes, causality by gradient, remat, tied embeddings, fused vs naive loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cce_jax import models

SMALL = dict(V=97, D=32, H=4, KV=2, L=2, F=64, T=24, dtype="float32")


def _tokens(cfg, b=2, t=11, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.V)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
  cfg = models.Config(**{**SMALL, "dtype": dtype})
  model = models.make_model(cfg)
  hidden = model(_tokens(cfg))
  assert hidden.shape == (2, 11, cfg.D) and hidden.dtype == jnp.dtype(dtype)
  assert model.classifier().shape == (cfg.V, cfg.D)
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  assert np.isfinite(np.asarray(hidden, np.float32)).all()


def test_param_counts():
  cfg = models.Config(**SMALL)
  k = cfg.D // cfg.H
  block = cfg.D * cfg.H * k * 2 + cfg.D * cfg.KV * k * 2 + 3 * cfg.D * cfg.F + 2 * cfg.D
  counts = models.param_counts(models.make_model(cfg))
  assert counts["non_embedding"] == cfg.L * block + cfg.D
  assert counts["total"] == counts["non_embedding"] + 2 * cfg.V * cfg.D
  tied = models.param_counts(models.make_model(models.Config(**SMALL, tie_embeddings=True)))
  assert tied["total"] == counts["total"] - cfg.V * cfg.D and tied["non_embedding"] == counts["non_embedding"]


def test_causal_by_gradient():
  cfg = models.Config(**SMALL)
  model = models.make_model(cfg)
  x = model.embed_tokens(_tokens(cfg, b=1, t=9))
  t = 4
  grad = jax.grad(lambda x: jnp.sum(model.apply_blocks(x)[:, t] ** 2))(x)
  per_position = np.asarray(jnp.abs(grad).sum(axis=(0, 2)))
  assert (per_position[t + 1:] == 0).all(), per_position
  assert (per_position[:t + 1] > 0).all(), per_position


def test_remat_same_loss_and_grads():
  base = models.make_model(models.Config(**SMALL), seed=3)
  remat = models.make_model(models.Config(**SMALL, remat=True), seed=3)
  tokens = _tokens(base.cfg)

  def loss_and_grads(model):
    return nnx.value_and_grad(lambda m: models.lm_loss(m, tokens, tokens, implementation="xla_chunked")[0])(model)

  (l1, g1), (l2, g2) = loss_and_grads(base), loss_and_grads(remat)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g2))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("fused", ["xla_chunked", "xla_fused"])
def test_fused_loss_matches_naive_on_the_model(tie, fused):
  model = models.make_model(models.Config(**SMALL, tie_embeddings=tie), seed=5)
  tokens = _tokens(model.cfg, seed=7)
  targets = jnp.roll(tokens, -1, axis=1).at[:, -1].set(-100)

  def loss_and_grads(impl):
    return nnx.value_and_grad(lambda m: models.lm_loss(m, tokens, targets, implementation=impl)[0])(model)

  (ln, gn), (lf, gf) = loss_and_grads("naive"), loss_and_grads(fused)
  np.testing.assert_allclose(lf, ln, rtol=1e-6)
  assert abs(float(ln) - np.log(model.cfg.V)) < 1.0  # near-uniform at init
  for a, b in zip(jax.tree.leaves(nnx.state(gf)), jax.tree.leaves(nnx.state(gn))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_loss_options_reach_the_fused_loss():
  model = models.make_model(models.Config(**SMALL), seed=6)
  tokens = _tokens(model.cfg, seed=8)

  def head_grad(**kw):
    grads = nnx.grad(lambda m: models.lm_loss(m, tokens, tokens, implementation="xla_chunked", **kw)[0])(model)
    return np.asarray(grads.head[...])

  # filter_eps=2 drops every tile (|softmax - onehot| <= 1); exact keeps them all.
  np.testing.assert_array_equal(head_grad(filter_eps=2.0), 0.0)
  assert np.abs(head_grad(exact=True)).max() > 0


def test_tied_classifier_is_the_embedding():
  model = models.make_model(models.Config(**SMALL, tie_embeddings=True))
  np.testing.assert_array_equal(model.classifier(), model.embed[...])
  assert not hasattr(model, "head")


@pytest.mark.parametrize("bad,match", [
    (dict(D=30), "multiple of H"), (dict(H=4, KV=3), "multiple of KV"), (dict(D=12, H=4), "even"),
    (dict(L=0), "positive int"), (dict(dtype="int32"), "float dtype")])
def test_config_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    models.Config(**{**SMALL, **bad})


def test_bad_inputs():
  model = models.make_model(models.Config(**SMALL))
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    model(jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="exceeds Config.T"):
    model(jnp.zeros((1, 25), jnp.int32))
  with pytest.raises(ValueError, match="unknown loss implementation"):
    models.lm_loss(model, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32), implementation="fast")
