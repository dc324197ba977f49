"""`cce_jax.sharded`: the op with the tokens, the vocabulary or both split over a mesh matches the op on the whole
problem (values, gradients, output splits), and rejects what it cannot split."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import cce_jax
from tests.ops.linear_cross_entropy import helpers
from tests.ops.linear_cross_entropy import test_shard_map


def _mesh(n=1):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


def _compare(kwargs, mesh, shape=(4, 12), d=24, v=211, rtol=1e-5, dtype=jnp.float32, split="batch_axes"):
  """Loss (or per-token losses) and gradients of the sharded op (split: a dict of its axes, or the name of the one
  argument that takes "data") against the op, on the same inputs."""
  split = {split: "data"} if isinstance(split, str) else split
  e, c, targets, bias = helpers.make_inputs(0, shape, d, v, dtype, bias=True, ignore_frac=0.2)
  weights = jax.random.uniform(jax.random.key(1), shape, jnp.float32)

  def run(fn):
    def scalar(e, c, b):
      out = fn(e, c, targets, bias=b, weights=weights, **kwargs)
      out = out[0] + 0.5 * out[1] if isinstance(out, tuple) else out
      return jnp.sum(out), out
    (_, out), grads = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True))(e, c, bias)
    return out, grads

  got = run(lambda *a, **k: cce_jax.sharded.linear_cross_entropy(*a, mesh=mesh, **split, **k))
  want = run(cce_jax.linear_cross_entropy)
  test_shard_map._assert_close(got, want, rtol)
  return got


@pytest.mark.parametrize("kwargs", [
    dict(reduction="mean"), dict(reduction="sum", softcap=20.0), dict(reduction="none", shift=1),
    dict(reduction="mean", return_lse=True, label_smoothing=0.1, z_loss=1e-3),
    dict(reduction="mean", implementation="xla_fused"), dict(reduction="mean", implementation="reference")])
def test_matches_the_op_on_one_device(kwargs):
  _compare(kwargs, _mesh())


def test_logprobs_match_on_one_device():
  e, c, targets, _ = helpers.make_inputs(2, (2, 10), 16, 97)
  got = cce_jax.sharded.token_logprobs(e, c, targets, mesh=_mesh(), batch_axes="data", return_entropy=True,
                                       shift=1, temperature=0.7)
  want = cce_jax.token_logprobs(e, c, targets, return_entropy=True, shift=1, temperature=0.7)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_rejects_what_it_cannot_split():
  e, c, targets, _ = helpers.make_inputs(3, (3, 8), 16, 50)
  split = dict(mesh=_mesh(), batch_axes="data")
  with pytest.raises(ValueError, match="not axes of the mesh"):
    cce_jax.sharded.linear_cross_entropy(e, c, targets, mesh=_mesh(), batch_axes="model")
  with pytest.raises(ValueError, match="shift=1 works along the last axis"):
    cce_jax.sharded.linear_cross_entropy(e[0], c, targets[0], shift=1, **split)
  with pytest.raises(ValueError, match="reduction"):
    cce_jax.sharded.linear_cross_entropy(e, c, targets, reduction="avg", **split)
  with pytest.raises(ValueError, match="not divisible by the 2 devices"):
    mesh2 = Mesh(np.array(jax.devices()[:1] * 2).reshape(2), ("data",)) if len(jax.devices()) == 1 else _mesh(2)
    cce_jax.sharded.linear_cross_entropy(e, c, targets, mesh=mesh2, batch_axes="data")


def test_unknown_option_is_an_error_naming_it():
  e, c, targets, _ = helpers.make_inputs(3, (3, 8), 16, 50)
  with pytest.raises(TypeError, match=r"linear_cross_entropy\(\) got unexpected keyword arguments \['softcapp'\]"):
    cce_jax.sharded.linear_cross_entropy(e, c, targets, mesh=_mesh(), batch_axes="data", softcapp=30.0)
  with pytest.raises(TypeError, match=r"\['weights'\]"):  # the op's option, but token_logprobs has none
    cce_jax.sharded.token_logprobs(e, c, targets, mesh=_mesh(), batch_axes="data", weights=None)


def test_public_signatures_carry_no_private_parameters():
  for fn in (cce_jax.linear_cross_entropy, cce_jax.token_logprobs, cce_jax.sharded.linear_cross_entropy,
             cce_jax.sharded.token_logprobs):
    assert not [p for p in inspect.signature(fn).parameters if p.startswith("_")], fn.__name__


def test_vocabulary_split_errors():
  e, c, targets, _ = helpers.make_inputs(6, (4, 8), 16, 50)
  mesh = _mesh()
  with pytest.raises(ValueError, match="at least one mesh axis"):
    cce_jax.sharded.linear_cross_entropy(e, c, targets, mesh=mesh)
  with pytest.raises(ValueError, match="share"):
    cce_jax.sharded.linear_cross_entropy(e, c, targets, mesh=mesh, batch_axes="data", vocab_axes="data")
  with pytest.raises(ValueError, match="needs a blockwise implementation"):
    cce_jax.sharded.linear_cross_entropy(e, c, targets, mesh=mesh, vocab_axes="data", implementation="reference")
  with pytest.raises(ValueError, match="xla_fused' does not take a vocabulary split"):
    cce_jax.sharded.linear_cross_entropy(e, c, targets, mesh=mesh, vocab_axes="data", implementation="xla_fused")
  with pytest.raises(ValueError, match="low_memory=True"):
    cce_jax.sharded.linear_cross_entropy(e, c, targets, mesh=mesh, vocab_axes="data", implementation="pallas_gpu",
                                         interpret=True, config=cce_jax.PallasGpuConfig(low_memory=True))


def test_vocabulary_split_on_one_device():
  _compare(dict(reduction="mean", softcap=20.0, label_smoothing=0.1), _mesh(), split="vocab_axes")


def test_split_over_four_devices():
  """Four CPU devices (a fresh process): the same values and gradients as the op, per-token results and dE split
  over the devices, the reduced loss and dC replicated; the batch split over both axes of a 2 × 2 mesh."""
  script = """
      import jax, numpy as np
      from jax.sharding import Mesh
      import cce_jax
      from tests.ops.linear_cross_entropy import test_sharded as t
      assert len(jax.devices()) == 4
      mesh = Mesh(np.array(jax.devices()), ("data",))
      for kw in (dict(reduction="mean", shift=1, softcap=15.0), dict(reduction="none"),
                 dict(reduction="sum", implementation="xla_fused")):
        out, (de, dc, db) = t._compare(kw, mesh, shape=(8, 6))
        assert len({s.index for s in de.addressable_shards}) == 4, de.sharding
        assert len({s.index for s in dc.addressable_shards}) == 1, dc.sharding
        if kw["reduction"] == "none":
          assert len({s.index for s in out.addressable_shards}) == 4, out.sharding
      for kw in (dict(reduction="mean", softcap=15.0, label_smoothing=0.1), dict(reduction="none", z_loss=1e-3)):
        out, (de, dc, db) = t._compare(kw, mesh, shape=(8, 6), v=212, split="vocab_axes")
        assert len({s.index for s in dc.addressable_shards}) == 4, dc.sharding
      grid = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
      for split in (dict(batch_axes="data", vocab_axes="model"), dict(vocab_axes=("data", "model"))):
        out, (de, dc, db) = t._compare(dict(reduction="mean", return_lse=True), grid, shape=(4, 6), v=212,
                                       split=split)
      e, c, targets, _ = t.helpers.make_inputs(5, (4, 7), 16, 100)
      got = cce_jax.sharded.token_logprobs(e, c, targets, mesh=grid, batch_axes="data", vocab_axes="model",
                                           return_entropy=True, temperature=0.7)
      want = cce_jax.token_logprobs(e, c, targets, return_entropy=True, temperature=0.7, implementation="reference")
      for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
      grid = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))  # the batch over both axes of a 2-D mesh
      e, c, targets, _ = t.helpers.make_inputs(4, (8, 5), 16, 300)
      got = cce_jax.sharded.linear_cross_entropy(e, c, targets, mesh=grid, batch_axes=("data", "fsdp"),
                                                 reduction="none")
      np.testing.assert_allclose(got, cce_jax.linear_cross_entropy(e, c, targets, reduction="none"), rtol=1e-5)
      assert len({s.index for s in got.addressable_shards}) == 4, got.sharding
      print("OK")
  """
  helpers.run_with_cpu_devices(script, 4)


@pytest.mark.gpu
def test_pallas_gpu_split_over_the_local_gpus():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  n = len(jax.devices())
  _compare(dict(reduction="mean", softcap=30.0, implementation="pallas_gpu"), _mesh(n), shape=(2 * n, 256),
           d=256, v=5000, rtol=2e-2, dtype=jnp.bfloat16)


@pytest.mark.gpu
def test_pallas_gpu_vocabulary_split_over_the_local_gpus():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  n = len(jax.devices())
  for filter_eps in ("auto", None):
    _compare(dict(reduction="mean", softcap=30.0, implementation="pallas_gpu", filter_eps=filter_eps), _mesh(n),
             shape=(4, 256), d=256, v=2560 * n, rtol=2e-2, dtype=jnp.bfloat16, split="vocab_axes")
