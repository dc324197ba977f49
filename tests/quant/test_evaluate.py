"""cce_jax.quant.evaluate against a float64 NumPy reference written here (logits, log-softmax, KL, argmax, Δp), on a
tiny Decoder and its int3-g32 copy; identical models; the Baseline reused; token chunking (no [N, V] logits); inputs."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cce_jax import quant
from cce_jax.models import Config, make_model
from cce_jax.quant import recipes

ev = importlib.import_module("cce_jax.quant.evaluate")  # the package's `evaluate` is the function

CFG = Config(V=96, D=64, H=4, KV=2, L=2, F=128, T=16, dtype="float32")
N_WINDOWS = 3


def _scaled(path, x):
  """The head ×20 and the block kernels ×5: at init the logits have std ~0.2 and the blocks barely move the
  residual stream, so a quantized copy would hardly differ; scaled, KL and top-1 have something to measure."""
  name = quant.params.path_str(path)
  return x * (20.0 if name == "head" else 5.0 if name.startswith("blocks") and x.ndim > 1 else 1.0)


@pytest.fixture(scope="module")
def models():
  fp = make_model(CFG, seed=0)
  params = jax.tree_util.tree_map_with_path(_scaled, nnx.to_pure_dict(nnx.state(fp, nnx.Param)))
  nnx.update(fp, params)
  q = make_model(CFG, seed=0)
  nnx.update(q, quant.dequantize_params(quant.quantize_params(params, recipes.decoder_rules("int3", 32))))
  return fp, q


@pytest.fixture(scope="module")
def stream():
  return np.random.default_rng(0).integers(0, CFG.V, N_WINDOWS * CFG.T + 5).astype(np.int32)


@pytest.fixture(scope="module")
def report(models, stream):
  fp, q = models
  return quant.evaluate(fp, q, stream, seq_len=CFG.T, batch_size=2, chunk_tokens=5, return_per_token=True)


def _reference(fp, q, wins):
  """Per-token quantities in float64 from each model's hidden states and classifier."""
  out = {k: [] for k in ("nll_fp", "nll_q", "kl", "same_top1", "delta_p")}
  for w in wins:
    inputs, targets = jnp.asarray(w[None, :-1]), w[1:]
    a = np.asarray(fp(inputs)[0], np.float64) @ np.asarray(fp.classifier(), np.float64).T
    b = np.asarray(q(inputs)[0], np.float64) @ np.asarray(q.classifier(), np.float64).T
    logp = a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
    logq = b - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True)) - b.max(-1, keepdims=True)
    rows = np.arange(len(targets))
    out["nll_fp"].append(-logp[rows, targets])
    out["nll_q"].append(-logq[rows, targets])
    out["kl"].append((np.exp(logp) * (logp - logq)).sum(-1))
    out["same_top1"].append(a.argmax(-1) == b.argmax(-1))
    out["delta_p"].append(np.exp(logq[rows, targets]) - np.exp(logp[rows, targets]))
  return {k: np.concatenate(v) for k, v in out.items()}


def test_matches_float64_reference(models, stream, report):
  fp, q = models
  res = report
  ref = _reference(fp, q, ev.windows(stream, CFG.T))
  got = res["per_token"]
  assert got["kl"].shape == (N_WINDOWS * CFG.T,)
  for k in ("nll_fp", "nll_q", "delta_p"):
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
  np.testing.assert_allclose(got["kl"], ref["kl"], rtol=1e-3, atol=2e-6)
  np.testing.assert_array_equal(got["same_top1"], ref["same_top1"])
  assert 1e-2 < res["kl_mean"] < 1.0 and 0.5 < res["top1_agreement"] < 1.0  # the test has something to measure
  nll_fp, nll_q, kl, dp = ref["nll_fp"], ref["nll_q"], ref["kl"], ref["delta_p"]
  expected = {
      "tokens": len(kl), "perplexity_fp": np.exp(nll_fp.mean()), "perplexity_q": np.exp(nll_q.mean()),
      "perplexity_change": np.exp(nll_q.mean() - nll_fp.mean()) - 1, "ln_ppl_ratio": (nll_q - nll_fp).mean(),
      "kl_mean": kl.mean(), "kl_stderr": kl.std(ddof=1) / np.sqrt(len(kl)), "kl_median": np.median(kl),
      "kl_p99": np.percentile(kl, 99), "kl_max": kl.max(), "top1_agreement": ref["same_top1"].mean(),
      "delta_p_mean": dp.mean(), "delta_p_rms": np.sqrt((dp ** 2).mean())}
  for k, v in expected.items():
    assert res[k] == pytest.approx(v, rel=2e-3, abs=1e-5), k


def test_identical_models_agree_exactly(models, stream):
  fp, _ = models
  res = quant.evaluate(fp, fp, stream, seq_len=CFG.T, batch_size=4)
  assert res["perplexity_q"] == res["perplexity_fp"] and res["top1_agreement"] == 1.0
  assert abs(res["kl_mean"]) < 1e-6 and res["kl_max"] < 1e-5 and res["delta_p_rms"] == 0.0


def test_baseline_reused_gives_the_same_report(models, stream, report):
  fp, q = models
  base = quant.baseline(fp, stream, seq_len=CFG.T, batch_size=2)
  seen = []
  again = quant.evaluate(base, q, stream, seq_len=CFG.T, progress=seen.append)  # batches of 2, chunks of 256
  for k in ("perplexity_fp", "perplexity_q", "kl_mean", "kl_max", "top1_agreement", "delta_p_rms"):
    assert again[k] == pytest.approx(report[k], rel=1e-5, abs=1e-7), k
  assert [(p["batch"], p["batches"], p["tokens"]) for p in seen] == [(1, 2, 32), (2, 2, 48)]
  with pytest.raises(ValueError, match="other windows"):
    quant.evaluate(base, q, stream, seq_len=8)


def test_kl_never_forms_all_logits():
  n, d, v, chunk = 64, 8, 96, 8
  jaxpr = str(jax.make_jaxpr(lambda a, c, b, e: ev._kl_and_top1(a, c, b, e, chunk))(  # pylint: disable=protected-access
      jnp.ones((n, d)), jnp.ones((v, d)), jnp.ones((n, d)), jnp.ones((v, d))))
  assert f"f32[{chunk},{v}]" in jaxpr and f"[{n},{v}]" not in jaxpr


def test_windows_and_bad_input(stream):
  wins = ev.windows(stream, CFG.T)
  assert wins.shape == (N_WINDOWS, CFG.T + 1) and wins.dtype == np.int32
  np.testing.assert_array_equal(wins[1], stream[CFG.T:2 * CFG.T + 1])
  assert ev.windows(stream, CFG.T, max_tokens=CFG.T + 1).shape == (2, CFG.T + 1)
  with pytest.raises(ValueError, match="needs seq_len"):
    quant.baseline(None, stream)
  with pytest.raises(TypeError, match="integer ids"):
    quant.baseline(None, stream.astype(np.float32), seq_len=4)
  with pytest.raises(ValueError, match="no window"):
    ev.windows(stream[:CFG.T], CFG.T)
  with pytest.raises(ValueError, match="chunk_tokens"):
    quant.evaluate(None, None, stream, seq_len=4, chunk_tokens=0)
