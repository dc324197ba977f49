"""The tile-config autotuner: candidate checks, the choice, the cache (interpret mode, a stand-in timer)."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest

from cce_jax import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy import autotune
from tests.ops.linear_cross_entropy import helpers

SMALL = PallasGpuConfig(block_n=16, block_v=32, block_d=16, num_splits=2)


def _inputs():
  e, c, targets, _ = helpers.make_inputs(3, (40,), 24, 200, dtype=jnp.bfloat16)
  return e, c, targets


def test_picks_the_fastest_and_caches_it(tmp_path):
  e, c, targets = _inputs()
  path = str(tmp_path / "cache.json")
  candidates = [SMALL, dataclasses.replace(SMALL, block_v=64), dataclasses.replace(SMALL, block_d=8)]
  calls = []

  def timer(fn, args):  # the stand-in: the second candidate is fastest
    calls.append(fn)
    return [3.0, 1.0, 2.0][len(calls) - 1]

  assert autotune.lookup(e, c, softcap=5.0, path=path) is None
  best = autotune.autotune(e, c, targets, softcap=5.0, candidates=candidates, path=path, interpret=True,
                           timer=timer)
  assert best == candidates[1] and len(calls) == 3
  assert autotune.lookup(e, c, softcap=5.0, path=path) == candidates[1]
  assert autotune.lookup(e, c, softcap=None, path=path) is None  # another key
  entry = json.load(open(path))[autotune.cache_key(e, c, softcap=5.0)]
  assert [t[1] for t in entry["timings_ms"]] == [3.0, 1.0, 2.0]


def test_failing_candidates_are_skipped(tmp_path):
  e, c, targets = _inputs()
  path = str(tmp_path / "cache.json")
  times = iter([None, 2.0])

  def timer(fn, args):
    t = next(times)
    if t is None:
      raise RuntimeError("out of shared memory")
    return t

  best = autotune.autotune(e, c, targets, candidates=[SMALL, dataclasses.replace(SMALL, block_n=32)], path=path,
                           interpret=True, timer=timer)
  assert best.block_n == 32
  entry = json.load(open(path))[autotune.cache_key(e, c)]
  assert "out of shared memory" in entry["timings_ms"][0][2]
  with pytest.raises(RuntimeError, match="no autotune candidate ran"):
    autotune.autotune(e, c, targets, candidates=[SMALL], path=path, interpret=True,
                      timer=lambda fn, args: 1 / 0)


def test_bad_candidates_and_unreadable_cache(tmp_path):
  e, c, targets = _inputs()
  with pytest.raises(ValueError, match="non-empty list"):
    autotune.autotune(e, c, targets, candidates=[], interpret=True)
  path = tmp_path / "cache.json"
  path.write_text("{not json")
  assert autotune.lookup(e, c, path=str(path)) is None


def test_default_candidates_start_with_the_heuristic():
  cands = autotune.default_candidates(8192, 256000, 2304, softcap=30.0, filtered=True)
  assert cands[0] == PallasGpuConfig.for_shape(8192, 256000, 2304, softcap=30.0, filtered=True)
  full = autotune.default_candidates(8192, 256000, 2304, softcap=30.0)  # the op's default: the full gradient
  assert full[0] == PallasGpuConfig.for_shape(8192, 256000, 2304, softcap=30.0)
  assert any(k.sort_vocabulary for k in cands) and not any(k.sort_vocabulary for k in full)
  assert len(cands) == len(set(cands)) >= 5


@pytest.mark.gpu
@pytest.mark.skipif(not helpers.has_gpu(), reason="needs an NVIDIA GPU")
def test_tunes_on_a_gpu(tmp_path):
  e, c, targets, _ = helpers.make_inputs(4, (2048,), 512, 32000, dtype=jnp.bfloat16)
  path = str(tmp_path / "cache.json")
  best = autotune.autotune(e, c, targets, softcap=30.0, repeats=3, path=path)
  assert best in autotune.default_candidates(2048, 32000, 512, softcap=30.0, filtered=False)  # the default mode
  assert autotune.lookup(e, c, softcap=30.0, path=path) == best


def test_default_candidates_add_the_triton_and_xla_alternatives_on_hopper(monkeypatch):
  monkeypatch.setattr(autotune.mosaic_pipeline, "is_hopper", lambda: True)
  filtered = autotune.default_candidates(4096, 128256, 4096, filtered=True)
  full = autotune.default_candidates(4096, 128256, 4096)
  assert any(k.forward_kernel == "triton" for k in filtered)
  assert any(k.dense_backward_kernel == "xla" for k in filtered)
  assert any(k.dense_backward_kernel == "xla" for k in full)
  monkeypatch.setattr(autotune.mosaic_pipeline, "is_hopper", lambda: False)
  assert not any(k.forward_kernel == "triton" for k in autotune.default_candidates(4096, 128256, 4096))
