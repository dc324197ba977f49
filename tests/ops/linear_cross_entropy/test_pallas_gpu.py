"""The op's test base on the Pallas GPU kernels: in the interpreter on CPU (CI), compiled on an NVIDIA GPU."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import cce_jax
from cce_jax import PallasGpuConfig
from tests.ops.linear_cross_entropy import helpers
from tests.ops.linear_cross_entropy.test_base import LinearCrossEntropyTestBase


def _has_gpu():
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


class TestPallasGpuInterpret(LinearCrossEntropyTestBase):
  """Small power-of-2 tiles that divide none of the odd test shapes, and several vocabulary splits."""

  implementation = "pallas_gpu"
  extra = {"config": PallasGpuConfig(block_n=16, block_v=64, block_d=16, num_splits=3), "interpret": True}


@pytest.mark.parametrize("flat_loop", [False, True])
@pytest.mark.parametrize("block_n,block_v,block_d,splits", [(1, 1, 1, 1), (4, 8, 8, 5), (64, 512, 64, None)])
def test_interpret_any_tile_shape(block_n, block_v, block_d, splits, flat_loop):
  e, c, targets, bias = helpers.make_inputs(31, (13,), 20, 300, bias=True)
  kw = dict(bias=bias, softcap=3.0, label_smoothing=0.1, reduction="none")
  ref = cce_jax.linear_cross_entropy(e, c, targets, implementation="reference", **kw)
  cfg = PallasGpuConfig(block_n, block_v, block_d, num_splits=splits, flat_loop=flat_loop)
  out = cce_jax.linear_cross_entropy(e, c, targets, implementation="pallas_gpu", config=cfg, interpret=True,
                                     **kw)
  np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)
  lp_kw = dict(bias=bias, softcap=3.0, temperature=0.7, return_entropy=True)
  lp_ref = cce_jax.token_logprobs(e, c, targets, implementation="reference", **lp_kw)
  lp = cce_jax.token_logprobs(e, c, targets, implementation="pallas_gpu", config=cfg, interpret=True, **lp_kw)
  np.testing.assert_allclose(lp, lp_ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bad", [0, 3, 48, 2.0])
def test_config_rejects_non_powers_of_two(bad):
  with pytest.raises(ValueError, match="power of 2"):
    PallasGpuConfig(block_n=bad)


@pytest.fixture
def highest_precision():
  """fp32 comparisons need IEEE fp32 dots: the GPU's default for f32 matmuls is TF32."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.usefixtures("highest_precision")
class TestPallasGpuCompiled(LinearCrossEntropyTestBase):
  """The same sweep through 'auto' on a GPU: compiled Triton kernels, default tiles (XLA below N, V, D = 16)."""

  implementation = "auto"
  extra = {}


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.usefixtures("highest_precision")
class TestPallasGpuCompiledSmallTiles(LinearCrossEntropyTestBase):
  """Compiled with the smallest tiles Triton's dot takes, so that edge blocks and splits are exercised."""

  implementation = "auto"
  extra = {"config": PallasGpuConfig(block_n=16, block_v=32, block_d=16, num_splits=3)}


def test_default_config_heuristic():
  light, capped = PallasGpuConfig.for_shape(4096, 128256, 4096), PallasGpuConfig.for_shape(8192, 256000, 2304,
                                                                                           softcap=30.0)
  assert (light.num_warps, light.bwd_warps) == (4, 8)
  assert (capped.num_warps, capped.bwd_warps) == (8, 8)
  assert PallasGpuConfig(num_warps=2).bwd_warps == 2
  with pytest.raises(ValueError, match="backward_warps"):
    PallasGpuConfig(backward_warps=0)
