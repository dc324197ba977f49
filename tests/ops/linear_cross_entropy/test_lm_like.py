"""The benchmark's lm_like regime: deterministic, calibrated to the requested entropy, with a trained LM's
statistics, scattered frequent ids and row-dependent large entries, and never an N × V array."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.linear_cross_entropy import inputs
from benchmarks.linear_cross_entropy import lm_like
from benchmarks.linear_cross_entropy.regime_stats import regime_stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
N, D, V = 512, 64, 8192


@functools.lru_cache(maxsize=None)
def _inputs(entropy=lm_like.DEFAULT_ENTROPY, dtype=jnp.float32, seed=0):
  return inputs.make_inputs(N, D, V, dtype, "lm_like", seed=seed, entropy=entropy)


def _stats(arrays, rows=lm_like.CALIBRATION_ROWS, softcap=None):
  e, c, targets = arrays
  return regime_stats(e[:rows], c, targets[:rows], softcap)


def test_same_seed_same_arrays_other_seed_others():
  again = inputs.make_inputs(N, D, V, jnp.float32, "lm_like", seed=0)
  other = _inputs(seed=1)
  for x, y, z in zip(_inputs(), again, other):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(x), np.asarray(z))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype):
  e, c, targets = _inputs(dtype=dtype)
  assert (e.shape, e.dtype, c.shape, c.dtype) == ((N, D), jnp.dtype(dtype), (V, D), jnp.dtype(dtype))
  assert targets.shape == (N,) and targets.dtype == jnp.int32
  assert 0 <= int(targets.min()) and int(targets.max()) < V
  assert np.isfinite(np.asarray(e, np.float32)).all() and np.isfinite(np.asarray(c, np.float32)).all()


@pytest.mark.parametrize("entropy", [3.0, 5.0])
def test_requested_entropy_is_hit_and_the_loss_lies_below_it(entropy):
  calibrated = _stats(_inputs(entropy))
  assert calibrated["entropy"] == pytest.approx(entropy, abs=0.02)
  assert calibrated["loss"] == pytest.approx(lm_like.LOSS_PER_ENTROPY * entropy, abs=0.1)
  e, c, targets = _inputs(entropy)
  r = lm_like.CALIBRATION_ROWS
  fresh = _stats((e[r:], c, targets[r:]))
  assert fresh["entropy"] == pytest.approx(entropy, abs=0.3)  # rows the calibration did not see
  assert fresh["loss"] < entropy - 1


def test_softcap_is_part_of_the_calibration():
  arrays = inputs.make_inputs(N, D, V, jnp.float32, "lm_like", entropy=3.0, softcap=30.0)
  assert _stats(arrays, softcap=30.0)["entropy"] == pytest.approx(3.0, abs=0.02)
  assert _stats(arrays)["entropy"] < 2.9  # without the cap the same inputs are sharper
  # A cap of 10 keeps every logit within 20 of the others: no scale brings the entropy down to 3 nats.
  with pytest.raises(ValueError, match="entropy=3.0 is out of reach at this shape and softcap=10.0"):
    inputs.make_inputs(N, D, V, jnp.float32, "lm_like", entropy=3.0, softcap=10.0)


def test_default_loss_and_entropy_are_a_trained_lms():
  s = _stats(_inputs(dtype=jnp.bfloat16), rows=N)
  assert 2.4 <= s["loss"] <= 3.0 and 3.9 <= s["entropy"] <= 5.7, s


def test_default_share_of_large_entries_at_a_large_vocabulary(monkeypatch):
  monkeypatch.setattr(lm_like, "CALIBRATION_ROWS", 64)  # a smaller sample: the CPU evaluates [rows, V] ~100 times
  arrays = inputs.make_inputs(64, D, 196608, jnp.bfloat16, "lm_like")
  s = _stats(arrays, rows=64)
  assert 0.0007 <= s["entries_kept"] <= 0.0013, s
  assert 2.4 <= s["loss"] <= 3.0 and 3.9 <= s["entropy"] <= 5.7, s


def test_frequent_ids_are_scattered_and_targets_follow_them():
  log_f, _ = lm_like.vocabulary(V)
  log_f = np.asarray(log_f)
  np.testing.assert_allclose(np.exp(log_f).sum(), 1.0, rtol=1e-4)
  top = np.argsort(-log_f)[:V // 100]  # the 1% most frequent ids
  assert top.min() < V / 8 and top.max() > 7 * V / 8, "frequent ids bunch up"
  assert abs(top.mean() - V / 2) < V / 8, "frequent ids bunch up"
  # Zipf: the r-th most frequent token is ~r^1.05 times rarer than the first
  ratio = log_f[top[0]] - log_f[top[9]]
  assert ratio == pytest.approx(lm_like.ZIPF_EXPONENT * math.log((10 + lm_like.ZIPF_OFFSET) / (1 + lm_like.ZIPF_OFFSET)), rel=1e-3)
  n = 20000  # targets enough to see the head's frequencies
  targets = np.asarray(inputs.make_inputs(n, D, V, jnp.float32, "lm_like")[2])
  share = np.bincount(targets, minlength=V) / n
  np.testing.assert_allclose(share[top[:5]], np.exp(log_f[top[:5]]), atol=0.005)
  assert share[top].sum() == pytest.approx(np.exp(log_f[top]).sum(), abs=0.02)


def test_rows_have_their_own_large_entries():
  # Context, not frequency alone, decides a row's top tokens: without the topics (TOPIC_LOGIT = 0) rows share 9% of
  # their top 8 and 70% of those are among the 128 most frequent ids.
  e, c, _ = _inputs()
  logits = np.asarray(e[:128] @ c.T)
  top8 = [set(row.tolist()) for row in np.argsort(-logits, axis=1)[:, :8]]
  overlap = np.mean([len(a & b) / 8 for i, a in enumerate(top8) for b in top8[i + 1:]])
  assert overlap < 0.05, f"rows share {overlap:.0%} of their top-8 tokens"
  frequent = set(np.argsort(-np.asarray(lm_like.vocabulary(V)[0]))[:128].tolist())
  in_frequent = np.mean([len(a & frequent) / 8 for a in top8])
  assert in_frequent < 0.5, f"{in_frequent:.0%} of the rows' top-8 tokens are among the 128 most frequent"


@pytest.mark.parametrize("regime,entropy,match", [
    ("lm_like", 0.0, "entropy=0.0 must lie in"), ("lm_like", -1.0, "must lie in"),
    ("lm_like", math.log(V), "must lie in"), ("zipf", None, "unknown regime 'zipf'"),
    ("random", 3.0, "applies to the lm_like regime only")])
def test_one_line_errors(regime, entropy, match):
  with pytest.raises(ValueError, match=match) as err:
    inputs.make_inputs(8, 16, V, jnp.float32, regime, entropy=entropy)
  assert "\n" not in str(err.value)


def test_no_array_of_n_by_v_at_a_large_shape():
  # gemma2_2b's head: the compiled steps' temporaries stay far below one fp32 N × V array (7.8 GiB)
  n, d, v = 8192, 2304, 256000
  key, f32 = jax.eval_shape(lambda: jax.random.key(0)), jnp.float32
  dirs = jax.ShapeDtypeStruct((lm_like._topics(v), d), f32)  # pylint: disable=protected-access
  vocab = (jax.ShapeDtypeStruct((v,), f32), jax.ShapeDtypeStruct((v,), jnp.int32))
  c = jax.ShapeDtypeStruct((v, d), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((lm_like.CALIBRATION_ROWS, d), f32)
  # pylint: disable=protected-access
  compiled = [lm_like._classifier.lower(key, dirs, *vocab, d, jnp.dtype(jnp.bfloat16)).compile(),
              lm_like._hidden.lower(key, dirs, *vocab, c, n).compile(),
              lm_like._calibrate.lower(rows, rows, jax.ShapeDtypeStruct((rows.shape[0],), jnp.int32), c,
                                       jax.ShapeDtypeStruct((), f32), 30.0).compile()]
  c_f32 = v * d * 4  # the CPU's dot upcasts a bf16 c; a GPU's does not
  for step in compiled:
    assert step.memory_analysis().temp_size_in_bytes < c_f32 + 2**30, step


def test_bench_loss_reports_the_regime(tmp_path):
  cmd = [sys.executable, "experiments/bench_loss.py", "--shapes=tiny", "--regimes=lm_like", "--lm_like_entropy=4",
         "--methods=naive", "--repeats=1", "--noaccuracy", f"--out={tmp_path}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert "| tiny | lm_like | " in out
  row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
  assert row["regime"] == "lm_like" and row["lm_like_entropy"] == 4.0
  assert row["regime_entropy"] == pytest.approx(4.0, abs=0.3)
  assert {"regime_loss", "regime_entries_kept", "regime_tiles_kept", "regime_mass_below"} <= set(row)


def test_bench_loss_skips_kernels_of_another_platform(tmp_path):
  """On CPU the pallas_gpu and pallas_tpu methods are skipped with a line each; the others still run."""
  cmd = [sys.executable, "experiments/bench_loss.py", "--shapes=tiny", "--regimes=random",
         "--methods=naive,pallas_gpu_full,pallas_tpu", "--repeats=1", "--noaccuracy", f"--out={tmp_path}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert "skipping pallas_gpu_full: its kernels need a GPU, this is cpu" in out
  assert "skipping pallas_tpu: its kernels need a TPU, this is cpu" in out
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert [r["method"] for r in rows] == ["naive"]
