"""The benchmark's regime statistics against float64 NumPy on small random inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.linear_cross_entropy import regime_stats


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("scale", [4.0, 40.0])  # a broad softmax, a peaked one
def test_regime_stats_match_numpy(softcap, scale):
  rng = np.random.default_rng(0)
  n, d, v = 37, 64, 3000
  c = (rng.standard_normal((v, d)) / np.sqrt(d)).astype(np.float32)
  t = rng.integers(0, v, n)
  rows = c[t] / np.linalg.norm(c[t], axis=1, keepdims=True)
  e = (scale * rows + 0.3 * rng.standard_normal((n, d))).astype(np.float32)
  got = regime_stats.regime_stats(jnp.asarray(e), jnp.asarray(c), jnp.asarray(t), softcap)

  z = e.astype(np.float64) @ c.astype(np.float64).T
  if softcap:
    z = softcap * np.tanh(z / softcap)
  logp = z - z.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  p = np.exp(logp)
  big = p >= 2.0 ** -12
  big[np.arange(n), t] = True
  tiles = [big[i:i + 32, j:j + 128].any() for i in range(0, n, 32) for j in range(0, v, 128)]
  np.testing.assert_allclose(got["loss"], -logp[np.arange(n), t].mean(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["entropy"], -(p * logp).sum(1).mean(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["entries_kept"], (p >= 2.0 ** -12).mean(), atol=2 / p.size)
  np.testing.assert_allclose(got["tiles_kept"], np.mean(tiles))
  np.testing.assert_allclose(got["mass_below"], np.where(p < 2.0 ** -12, p, 0).sum(1).mean(), rtol=1e-3, atol=1e-7)
  if scale > 10:
    assert 0 < got["tiles_kept"] < 1  # peaked enough to skip some tiles
  else:
    assert got["loss"] > 1 and got["entropy"] > 1


def test_cli_prints_every_regime_and_refuses_unknown_ones(capsys):
  regime_stats.main(["--shapes=tiny", "--regimes=random,lm_like", "--lm_like_entropy=3", "--tokens=64"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[1] == regime_stats.TABLE_HEADER.splitlines()[0]
  lm_like_line = next(line for line in lines if line.startswith("| tiny | lm_like |"))
  assert abs(float(lm_like_line.split("|")[4]) - 3.0) < 0.3  # the entropy column
  assert any(line.startswith("| tiny | random |") for line in lines)
  with pytest.raises(SystemExit):
    regime_stats.main(["--shapes=tiny", "--regimes=lm"])
