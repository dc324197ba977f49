"""Every JAX method of `experiments/bench_loss.py` resolves in the harness; the TPU ones pass what they name."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from benchmarks.linear_cross_entropy import harness

JAX_METHODS = ("naive", "xla_chunked", "xla_fused", "xla_fused_exact", "pallas_gpu", "pallas_gpu_sparse",
               "pallas_gpu_sorted", "pallas_gpu_triton", "pallas_gpu_lowmem", "pallas_gpu_full",
               "pallas_gpu_full_recompute", "pallas_gpu_exact", "pallas_tpu", "pallas_tpu_split", "pallas_tpu_filtered")


@pytest.mark.parametrize("method", JAX_METHODS)
def test_method_resolves(method):
  assert callable(harness.loss_fn(method, None))


@pytest.mark.parametrize("method, backward, filter_eps", [("pallas_tpu_split", "split", None),
                                                          ("pallas_tpu_filtered", None, "auto")])
def test_tpu_methods_pass_their_options(monkeypatch, method, backward, filter_eps):
  seen = {}
  monkeypatch.setattr(harness, "linear_cross_entropy", lambda *a, **kw: seen.update(kw))
  harness.loss_fn(method, None)(jnp.zeros((24, 16), jnp.bfloat16), jnp.zeros((40, 16), jnp.bfloat16),
                                jnp.zeros((24,), jnp.int32))
  assert seen["implementation"] == "pallas_tpu" and seen.get("filter_eps") == filter_eps
  assert getattr(seen.get("config"), "backward", None) == backward
