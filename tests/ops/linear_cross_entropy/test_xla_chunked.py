"""The op's test base on the blockwise XLA implementation, with tiles that force edge blocks and the default."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax
from cce_jax import XlaChunkedConfig
from tests.ops.linear_cross_entropy import helpers
from tests.ops.linear_cross_entropy.test_base import LinearCrossEntropyTestBase


class TestXlaChunkedSmallTiles(LinearCrossEntropyTestBase):
  """Tiles much smaller than N and V, neither dividing them: many tiles, moved-back edge blocks."""

  implementation = "xla_chunked"
  extra = {"config": XlaChunkedConfig(block_n=8, block_v=96)}


class TestXlaChunkedDefaultTiles(LinearCrossEntropyTestBase):
  implementation = "xla_chunked"
  extra = {}


@pytest.mark.parametrize("block_n,block_v", [(1, 1), (3, 7), (16, 1000), (10_000, 10_000)])
def test_any_tile_shape_gives_the_same_result(block_n, block_v):
  e, c, targets, bias = helpers.make_inputs(21, (13,), 20, 300, bias=True)
  kw = dict(bias=bias, softcap=3.0, label_smoothing=0.1, reduction="none")
  ref = cce_jax.linear_cross_entropy(e, c, targets, implementation="reference", **kw)
  out = cce_jax.linear_cross_entropy(
      e, c, targets, implementation="xla_chunked", config=XlaChunkedConfig(block_n, block_v), **kw)
  np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)


def test_default_config_bounds_the_tile():
  cfg = XlaChunkedConfig.for_shape(8192, 256000, 2304)
  assert cfg.block_n * cfg.block_v <= 1 << 20
  small = XlaChunkedConfig.for_shape(5, 7, 3)
  assert (small.block_n, small.block_v) == (5, 7)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_config_rejects_bad_blocks(bad):
  with pytest.raises(ValueError, match="block_n"):
    XlaChunkedConfig(block_n=bad, block_v=8)


def test_bf16_gradients_come_back_in_bf16_and_lse_in_fp32():
  e, c, targets, _ = helpers.make_inputs(22, (4, 6), 32, 100, jnp.bfloat16)
  loss, lse = cce_jax.linear_cross_entropy(e, c, targets, return_lse=True)
  assert loss.dtype == jnp.float32 and lse.dtype == jnp.float32 and lse.shape == (4, 6)
  de, dc = jax.grad(lambda e, c: cce_jax.linear_cross_entropy(e, c, targets), argnums=(0, 1))(e, c)
  assert de.dtype == jnp.bfloat16 and dc.dtype == jnp.bfloat16
