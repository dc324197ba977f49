"""The op inside `jax.shard_map` with check_vma=True (the default): every implementation traces there, and with the
tokens split over the mesh (the classifier replicated) loss and gradients match the unsharded op.

The type checks run at any mesh size, so most tests use a mesh of the one CPU device; one test starts a process
with four CPU devices. Pallas kernels run in the interpreter on CPU, which does not trace under check_vma=True
(its dynamic slices mix varying data with program ids): there the CPU test turns the checks off, and the GPU test
runs the compiled kernels with them on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import cce_jax
from cce_jax import PallasGpuConfig
from tests.ops.linear_cross_entropy import helpers

try:
  from jax import shard_map
except ImportError:  # older jax
  from jax.experimental.shard_map import shard_map

def _sharded_sum(fn, mesh, check_vma=True):
  """sum over tokens of fn(e, c, bias, targets) per token, with the tokens split over the mesh's "data" axis."""
  local = lambda e, c, b, t: jax.lax.psum(jnp.sum(fn(e, c, b, t)), "data")
  return shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")), out_specs=P(),
                   check_vma=check_vma)


def _value_and_grads(fn, e, c, bias, targets):
  return jax.jit(jax.value_and_grad(lambda e, c, b: jnp.sum(fn(e, c, b, targets)), argnums=(0, 1, 2)))(e, c, bias)


def _assert_close(got, want, rtol):
  (val, grads), (val_ref, grads_ref) = got, want
  np.testing.assert_allclose(val, val_ref, rtol=rtol)
  for g, r in zip(grads, grads_ref):
    assert (g is None) == (r is None)
    if g is not None:  # summation order differs: the tolerance is relative to the largest entry
      assert g.dtype == r.dtype and g.shape == r.shape
      g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
      np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * np.abs(r).max())


def _mesh():
  return Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.mark.parametrize("implementation", ["xla_chunked", "xla_fused", "reference"])
@pytest.mark.parametrize("options", [dict(), dict(softcap=20.0, label_smoothing=0.1), dict(z_loss=1e-3, shift=1)])
def test_loss_and_grads_inside_shard_map(implementation, options):
  e, c, targets, bias = helpers.make_inputs(0, (2, 24), 48, 301, bias=True)
  targets = targets.at[0, 3].set(-100)
  per_token = lambda e, c, b, t: cce_jax.linear_cross_entropy(e, c, t, bias=b, reduction="sum",
                                                              implementation=implementation, **options)
  got = _value_and_grads(_sharded_sum(per_token, _mesh()), e, c, bias, targets)
  _assert_close(got, _value_and_grads(per_token, e, c, bias, targets), rtol=1e-5)


def test_filtered_bf16_backward_inside_shard_map():
  e, c, targets, _ = helpers.make_inputs(5, (48,), 32, 400, regime="peaked")
  e, c = e.astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  per_token = lambda e, c, b, t: cce_jax.linear_cross_entropy(e, c, t, reduction="sum", softcap=30.0,
                                                              implementation="xla_chunked")  # filter_eps "auto"
  got = _value_and_grads(_sharded_sum(per_token, _mesh()), e, c, None, targets)
  _assert_close(got, _value_and_grads(per_token, e, c, None, targets), rtol=1e-2)


@pytest.mark.parametrize("implementation", ["xla_chunked", "reference"])
def test_logprobs_and_lse_inside_shard_map(implementation):
  e, c, targets, bias = helpers.make_inputs(1, (40,), 32, 257, bias=True)

  def per_token(e, c, b, t):
    logp, entropy = cce_jax.token_logprobs(e, c, t, bias=b, temperature=0.8, return_entropy=True,
                                           implementation=implementation)
    _, lse = cce_jax.linear_cross_entropy(e, c, t, bias=b, reduction="none", return_lse=True,
                                          implementation=implementation)
    return logp + 0.5 * entropy + 0.25 * lse

  got = _value_and_grads(_sharded_sum(per_token, _mesh()), e, c, bias, targets)
  _assert_close(got, _value_and_grads(per_token, e, c, bias, targets), rtol=1e-5)


def test_pallas_kernels_inside_shard_map_interpreted():
  e, c, targets, _ = helpers.make_inputs(2, (64,), 64, 300)
  e, c = e.astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  per_token = lambda e, c, b, t: cce_jax.linear_cross_entropy(
      e, c, t, reduction="sum", implementation="pallas_gpu", filter_eps=None, interpret=True,
      config=PallasGpuConfig(block_n=16, block_v=64, block_d=32, num_warps=4, num_stages=1))
  got = _value_and_grads(_sharded_sum(per_token, _mesh(), check_vma=False), e, c, None, targets)
  want = _value_and_grads(per_token, e, c, None, targets)
  _assert_close(got, want, rtol=1e-5)


def test_tokens_split_over_four_devices():
  """Four CPU devices (a fresh process): each holds a quarter of the tokens; the replicated classifier's gradient
  is summed over them by the transpose of the op's own pcast."""
  script = """
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, PartitionSpec as P
      import cce_jax
      from tests.ops.linear_cross_entropy import test_shard_map as t
      from tests.ops.linear_cross_entropy import helpers
      assert len(jax.devices()) == 4
      mesh = Mesh(np.array(jax.devices()), ("data",))
      e, c, targets, bias = helpers.make_inputs(3, (64,), 40, 523, bias=True)
      for impl in ("xla_chunked", "xla_fused"):
        per_token = lambda e, c, b, tg: cce_jax.linear_cross_entropy(e, c, tg, bias=b, softcap=15.0,
                                                                     reduction="sum", implementation=impl)
        got = t._value_and_grads(t._sharded_sum(per_token, mesh), e, c, bias, targets)
        t._assert_close(got, t._value_and_grads(per_token, e, c, bias, targets), rtol=1e-5)
        de_shards = {s.device for s in got[1][0].addressable_shards}
        assert len(de_shards) == 4, de_shards
      print("OK")
  """
  helpers.run_with_cpu_devices(script, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["default", "low_memory", "sorted", "full", "exact", "triton_forward"])
def test_gpu_kernels_inside_shard_map(variant):
  """Over all local GPUs. One GPU checks that the kernels trace with check_vma on; two or more also check the
  values (an output typed invariant by mistake doubles the gradients on two)."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  mesh = Mesh(np.array(jax.devices()), ("data",))
  n = 512 * len(jax.devices())
  e, c, targets, _ = helpers.make_inputs(4, (n,), 256, 5000, regime="peaked")
  e, c = e.astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  kw = dict(softcap=30.0, implementation="pallas_gpu", reduction="sum")
  if variant in ("default", "low_memory", "sorted", "triton_forward"):  # the filtered backward's kernels
    kw["filter_eps"] = "auto"
  base = PallasGpuConfig.for_shape(n, 5000, 256, softcap=30.0, filtered=variant in ("default", "low_memory"))
  if variant == "low_memory":
    kw["config"] = dataclasses.replace(base, low_memory=True)
  elif variant == "sorted":
    kw["config"] = dataclasses.replace(base, sort_vocabulary=True)
  elif variant == "full":
    kw["filter_eps"] = None
  elif variant == "exact":
    kw["exact"] = True
  elif variant == "triton_forward":
    kw["config"] = dataclasses.replace(base, forward_kernel="triton")
  per_token = lambda e, c, b, t: cce_jax.linear_cross_entropy(e, c, t, **kw)
  got = _value_and_grads(_sharded_sum(per_token, mesh), e, c, None, targets)
  want = _value_and_grads(per_token, e, c, None, targets)
  _assert_close(got, want, rtol=2e-2)
