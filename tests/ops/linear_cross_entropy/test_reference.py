"""The oracle itself, checked against float64 NumPy formulas and optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cce_jax
from tests.ops.linear_cross_entropy import helpers
from tests.ops.linear_cross_entropy.helpers import IGNORE


@pytest.mark.parametrize("opts", [
    dict(),
    dict(softcap=2.0),
    dict(label_smoothing=0.3, z_loss=0.01, softcap=5.0),
])
def test_reference_matches_numpy(opts):
  e, c, t, b = helpers.make_inputs(1, (19,), 12, 77, jnp.float32, ignore_frac=0.2, bias=True)
  loss, lse = cce_jax.linear_cross_entropy(e, c, t, bias=b, reduction="none", return_lse=True,
                                           implementation="reference", **opts)
  want_loss, want_lse = helpers.numpy_loss(e, c, t, b, **opts)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
  mean = cce_jax.linear_cross_entropy(e, c, t, bias=b, implementation="reference", **opts)
  np.testing.assert_allclose(mean, want_loss.sum() / (np.asarray(t) != IGNORE).sum(), rtol=1e-5)


def test_label_smoothing_matches_optax():
  e, c, t, _ = helpers.make_inputs(2, (23,), 16, 50)
  alpha = 0.15
  logits = e @ c.T
  labels = optax.smooth_labels(jax.nn.one_hot(t, 50), alpha)
  want = optax.softmax_cross_entropy(logits, labels)
  got = cce_jax.linear_cross_entropy(e, c, t, label_smoothing=alpha, reduction="none",
                                     implementation="reference")
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_token_logprobs_matches_numpy():
  e, c, t, _ = helpers.make_inputs(3, (2, 9), 8, 31)
  logp, ent = cce_jax.token_logprobs(e, c, t, temperature=0.5, softcap=3.0, return_entropy=True,
                                     implementation="reference")
  logits = 3.0 * np.tanh(np.asarray(e, np.float64) @ np.asarray(c, np.float64).T / 3.0) / 0.5
  logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(logp, np.take_along_axis(logq, np.asarray(t)[..., None], -1)[..., 0], rtol=1e-5)
  np.testing.assert_allclose(ent, -(np.exp(logq) * logq).sum(-1), rtol=1e-5)


def test_weighted_mean_and_sum():
  e, c, t, _ = helpers.make_inputs(4, (3, 7), 8, 40, ignore_frac=0.3)
  w = jax.random.uniform(jax.random.key(0), t.shape)
  per_token = np.asarray(cce_jax.linear_cross_entropy(e, c, t, reduction="none", implementation="reference"))
  valid = np.asarray(t) != IGNORE
  got_sum = cce_jax.linear_cross_entropy(e, c, t, weights=w, reduction="sum", implementation="reference")
  got_mean = cce_jax.linear_cross_entropy(e, c, t, weights=w, implementation="reference")
  np.testing.assert_allclose(got_sum, (per_token * np.asarray(w)).sum(), rtol=1e-5)
  np.testing.assert_allclose(got_mean, (per_token * np.asarray(w)).sum() / np.asarray(w)[valid].sum(),
                             rtol=1e-5)


def test_empty_batch():
  e = jnp.zeros((0, 8))
  c = jax.random.normal(jax.random.key(0), (10, 8))
  t = jnp.zeros((0,), jnp.int32)
  assert float(cce_jax.linear_cross_entropy(e, c, t)) == 0.0
  assert cce_jax.linear_cross_entropy(e, c, t, reduction="none").shape == (0,)
