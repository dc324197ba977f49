"""The low-memory mode's per-row reference (`lse_estimate`): an estimate of the LSE from a vocabulary sample."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import lse_estimate
from tests.ops.linear_cross_entropy import helpers


def _stats(softcap=None, inv_temperature=1.0):
  return base.StatsSpec(softcap=softcap, inv_temperature=inv_temperature, with_sum=False, with_mean=False,
                        exact=False, filter_eps=None)


def _lse(e, c, bias, softcap, inv_temperature):
  z = jnp.dot(e.astype(jnp.float32), c.astype(jnp.float32).T, precision="highest")
  if bias is not None:
    z = z + bias[None, :]
  s = softcap * jnp.tanh(z / softcap) if softcap else z
  return jax.nn.logsumexp(s * inv_temperature, axis=1)


@pytest.mark.parametrize("softcap,inv_temperature,bias", [(None, 1.0, False), (5.0, 1.0, True), (5.0, 0.5, False)])
def test_every_column_sampled_gives_the_lse(softcap, inv_temperature, bias):
  """With the whole vocabulary as the sample and no margin the estimate is the LSE itself; ignored rows +inf."""
  e, c, targets, b = helpers.make_inputs(60, (37,), 24, 91, bias=bias, regime="peaked", ignore_frac=0.2)
  stats = _stats(softcap, inv_temperature)
  ref = np.asarray(lse_estimate.reference(stats, e, c, b, targets, samples=91, z=0.0))
  want = np.asarray(_lse(e, c, b, softcap, inv_temperature))
  live = np.asarray(targets) >= 0
  assert (~live).any() and np.isinf(ref[~live]).all() and (ref[~live] > 0).all()
  np.testing.assert_allclose(ref[live], want[live], rtol=1e-5, atol=1e-5)
  # a margin only lowers it
  low = np.asarray(lse_estimate.reference(stats, e, c, b, targets, samples=91))
  assert (low[live] <= ref[live] + 1e-6).all() and (low[live] < ref[live] - 1e-3).any()


@pytest.mark.parametrize("regime", ["random", "peaked"])
def test_sampled_estimate_is_close_and_mostly_below(regime):
  """A 256-column sample of a 4099-column vocabulary (stride 16, the target left out): within a few tenths of a
  nat of the LSE, below it on average, on bf16 inputs."""
  e, c, targets, _ = helpers.make_inputs(61, (300,), 64, 4099, jnp.bfloat16, regime=regime)
  c = c * 0.5  # unit-scale logits, as in the benchmark's regimes
  ref = np.asarray(lse_estimate.reference(_stats(30.0), e, c, None, targets, samples=256))
  gap = np.asarray(_lse(e, c, None, 30.0, 1.0)) - ref
  assert np.isfinite(gap).all()
  assert -0.3 < gap.min() and gap.max() < 1.0 and 0.0 < gap.mean() < 0.5, (gap.min(), gap.mean(), gap.max())


def test_one_large_sampled_logit_is_not_scaled_up():
  """A single large logit that falls in the sample counts once, not V / samples times."""
  e, c, targets, _ = helpers.make_inputs(62, (8,), 16, 1024, regime="random")
  targets = jnp.zeros_like(targets)  # target column 0, not sampled (columns 2, 6, 10, ... at stride 4)
  c = c.at[2].set(e[0] * 3.0 / jnp.linalg.norm(e[0]))  # row 0's logit at column 2: ~3 |e0|, far above the rest
  ref = np.asarray(lse_estimate.reference(_stats(), e, c, None, targets, samples=256))
  want = np.asarray(_lse(e, c, None, None, 1.0))
  assert want[0] - 0.5 < ref[0] <= want[0] + 0.05


def test_sizes_fit_the_budget():
  for n, v, d in [(8192, 256000, 2304), (4096, 128256, 4096), (16384, 151936, 1024), (5, 3, 7)]:
    samples, rows = lse_estimate.sizes(n, v, d)
    assert 1 <= samples <= min(v, lse_estimate.MAX_SAMPLES) and samples * d <= max(d, 1 << 21)
    assert 8 <= rows and rows * d <= max(8 * d, 1 << 21) and rows * samples <= 1 << 20
