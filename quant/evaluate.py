"""A quantized model against its full-precision original: perplexity, KL divergence, top-1 agreement and Δp.

`evaluate(model_fp, model_q, tokens)` scores both `cce_jax.models.Decoder`s on the same held-out windows and
reports what llama.cpp's KL-divergence mode (`llama-perplexity --kl-divergence`) reports, per scored token t with
P = the full-precision next-token distribution and Q = the quantized one:

- perplexity of each model, exp(mean −log p(target)), from the fused loss (`cce_jax.token_logprobs` on the hidden
  states and the classifier: no [tokens, V] logits), and the mean of ln(PPL(Q) / PPL(P)) per token;
- KL(P ‖ Q) = Σ_v P_v (log P_v − log Q_v) in nats: mean (with its standard error), median, 99th percentile, max;
- top-1 agreement ("same top p"): the share of tokens whose argmax is the same under P and Q;
- Δp = Q(target) − P(target): mean and RMS.

Memory. KL and the argmax need both full distributions, so the logits are formed `chunk_tokens` tokens at a time
(`lax.map` over token chunks): at most about 6 · chunk_tokens · V · 4 bytes of fp32 logits and log-probabilities
are alive at once (256 tokens at V = 49152: ~300 MB; at V = 2048: ~13 MB), never [tokens, V]. Per batch the
models' own activations ([batch, T, D] per layer, [batch, heads, T, T] attention) come on top. The per-token
results (five fp32 numbers per token) are kept on the host for the median and percentiles.

Precision: logits, softmax and every sum in fp32 (the models' hidden states and classifiers are upcast; the
classifier products at HIGHEST precision, so no TF32 on GPUs: int8's KL can be ~1e-5), per-token results fp32,
summaries accumulated in float64 on the host.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cce_jax.ops.linear_cross_entropy import token_logprobs

_HIGHEST = jax.lax.Precision.HIGHEST


def windows(tokens, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
  """Non-overlapping windows int32 [N, seq_len + 1] of a 1-D token stream (window i = tokens[i·T : i·T + T + 1],
  as `cce_jax.data.eval_batches` cuts them), the first ceil(max_tokens / seq_len) of them when max_tokens is set."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"a token stream must be 1-D, got shape {tokens.shape}")
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  n = (len(tokens) - 1) // seq_len
  if max_tokens is not None:
    n = min(n, -(-max_tokens // seq_len))
  if n < 1:
    raise ValueError(f"{len(tokens)} tokens make no window of {seq_len} + 1 tokens")
  return np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int32)


def _as_windows(tokens, seq_len, max_tokens) -> np.ndarray:
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
  if tokens.ndim == 2:
    if tokens.shape[1] < 2:
      raise ValueError(f"windows [N, T + 1] need T >= 1, got shape {tokens.shape}")
    if max_tokens is not None:
      tokens = tokens[:max(1, -(-max_tokens // (tokens.shape[1] - 1)))]
    return tokens.astype(np.int32)
  if seq_len is None:
    raise ValueError("a 1-D token stream needs seq_len (or pass windows [N, T + 1])")
  return windows(tokens, seq_len, max_tokens)


def _jitted_forward(model):
  """tokens [B, T] -> (hidden [B, T, D] in the model's compute dtype, classifier [V, D]) as one jitted call."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, inputs_BxT):
    m = nnx.merge(graphdef, state)
    return m(inputs_BxT), m.classifier()

  return lambda inputs_BxT: forward(state, inputs_BxT)


@dataclasses.dataclass
class Baseline:
  """The full-precision side of `evaluate`, computed once and reused for every quantized model.

  windows: int32 [N, T + 1]; batch_size: windows per batch; hidden: per batch, fp32 [b, T, D]; classifier: fp32
  [V, D]; logprobs: per batch, fp32 [b, T] log P(target).
  """
  windows: np.ndarray
  batch_size: int
  hidden: list
  classifier: jax.Array
  logprobs: list
  seconds: float


def _batches(wins, batch_size):
  for start in range(0, len(wins), batch_size):
    yield wins[start:start + batch_size]


def baseline(model_fp, tokens, *, seq_len: int | None = None, batch_size: int = 8,
             max_tokens: int | None = None) -> Baseline:
  """The full-precision model's hidden states and target log-probabilities on `tokens` (as `evaluate` takes them)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  wins = _as_windows(tokens, seq_len, max_tokens)
  forward = _jitted_forward(model_fp)
  logprob_fn = jax.jit(lambda h, c, t: token_logprobs(h, c, t, exact=True))
  t0 = time.perf_counter()
  hidden, logprobs, c = [], [], None
  for win in _batches(wins, batch_size):
    h, c = forward(jnp.asarray(win[:, :-1]))
    h, c = h.astype(jnp.float32), c.astype(jnp.float32)
    hidden.append(h)
    logprobs.append(logprob_fn(h, c, jnp.asarray(win[:, 1:])))
  jax.block_until_ready(logprobs)
  return Baseline(wins, batch_size, hidden, c, logprobs, time.perf_counter() - t0)


def _kl_and_top1(h_fp_NxD, c_fp_VxD, h_q_NxD, c_q_VxD, chunk):
  """Per token (fp32 [N]): KL(P ‖ Q) and whether the argmaxes agree, `chunk` tokens of logits at a time."""
  n, d = h_fp_NxD.shape
  pad = -n % chunk

  def split(h):
    return jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, d)

  def one(args):
    a_hxD, b_hxD = args
    logp = jax.nn.log_softmax(jnp.dot(a_hxD, c_fp_VxD.T, precision=_HIGHEST, preferred_element_type=jnp.float32), -1)
    logq = jax.nn.log_softmax(jnp.dot(b_hxD, c_q_VxD.T, precision=_HIGHEST, preferred_element_type=jnp.float32), -1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return kl, jnp.argmax(logp, axis=-1) == jnp.argmax(logq, axis=-1)

  kl, same = jax.lax.map(one, (split(h_fp_NxD), split(h_q_NxD)))
  return kl.reshape(-1)[:n], same.reshape(-1)[:n]


def _batch_fn(model_q, chunk):
  graphdef, state = nnx.split(model_q)

  @jax.jit
  def stats(state, h_fp_BxTxD, c_fp_VxD, lp_fp_BxT, windows_BxT1):
    m = nnx.merge(graphdef, state)
    inputs, targets = windows_BxT1[:, :-1], windows_BxT1[:, 1:]
    h_q = m(inputs).astype(jnp.float32)
    c_q = m.classifier().astype(jnp.float32)
    lp_q = token_logprobs(h_q, c_q, targets, exact=True)
    d = h_q.shape[-1]
    kl, same = _kl_and_top1(h_fp_BxTxD.reshape(-1, d), c_fp_VxD, h_q.reshape(-1, d), c_q, chunk)
    dp = jnp.exp(lp_q) - jnp.exp(lp_fp_BxT)
    return {"nll_fp": -lp_fp_BxT.reshape(-1), "nll_q": -lp_q.reshape(-1), "kl": kl, "same_top1": same,
            "delta_p": dp.reshape(-1)}

  return lambda *args: stats(state, *args)


def summarize(per_token: dict) -> dict:
  """The report (module docstring) from per-token arrays {"nll_fp", "nll_q", "kl", "same_top1", "delta_p"}."""
  nll_fp, nll_q = (np.asarray(per_token[k], np.float64) for k in ("nll_fp", "nll_q"))
  kl, dp = np.asarray(per_token["kl"], np.float64), np.asarray(per_token["delta_p"], np.float64)
  n = len(kl)
  ppl_fp, ppl_q = math.exp(nll_fp.mean()), math.exp(nll_q.mean())
  return {
      "tokens": n,
      "perplexity_fp": ppl_fp,
      "perplexity_q": ppl_q,
      "perplexity_change": ppl_q / ppl_fp - 1.0,
      "ln_ppl_ratio": float((nll_q - nll_fp).mean()),
      "kl_mean": float(kl.mean()),
      "kl_stderr": float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
      "kl_median": float(np.median(kl)),
      "kl_p99": float(np.percentile(kl, 99)),
      "kl_max": float(kl.max()),
      "top1_agreement": float(np.mean(np.asarray(per_token["same_top1"], np.float64))),
      "delta_p_mean": float(dp.mean()),
      "delta_p_rms": float(np.sqrt(np.mean(dp * dp))),
  }


def evaluate(model_fp, model_q, tokens, *, seq_len: int | None = None, batch_size: int = 8,
             max_tokens: int | None = None, chunk_tokens: int = 256,
             progress: Callable[[dict], None] | None = None, return_per_token: bool = False) -> dict:
  """Compares `model_q` with `model_fp` on held-out tokens (metrics: module docstring).

  Args:
    model_fp: the full-precision `Decoder` (model(tokens [B, T]) -> hidden [B, T, D], model.classifier() -> [V, D]),
      or a `Baseline` from `baseline(model_fp, tokens, ...)` with the same windows (reused across models).
    model_q: the quantized `Decoder` (e.g. its parameters from `dequantize_params(quantize_params(...))`).
    tokens: a 1-D int token stream (cut into windows of `seq_len` + 1, see `windows`) or int windows [N, T + 1];
      every window scores its T next-token predictions.
    seq_len: window length for a 1-D stream.
    batch_size: windows per forward pass.
    max_tokens: score only the first ceil(max_tokens / T) windows.
    chunk_tokens: tokens whose full logits are formed at once for KL and top-1 (memory: module docstring).
    progress: called after every batch with {"batch", "batches", "tokens", "seconds"}.
    return_per_token: also return the per-token fp32 arrays under "per_token".

  Returns:
    {"tokens", "perplexity_fp", "perplexity_q", "perplexity_change" (PPL(Q)/PPL(P) − 1), "ln_ppl_ratio",
    "kl_mean", "kl_stderr", "kl_median", "kl_p99", "kl_max", "top1_agreement" (in [0, 1]), "delta_p_mean",
    "delta_p_rms", "seconds" (the quantized side; plus the baseline's when it was computed here)}.
  """
  if chunk_tokens < 1:
    raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
  if isinstance(model_fp, Baseline):
    base = model_fp
    wins = _as_windows(tokens, seq_len, max_tokens)
    if not np.array_equal(wins, base.windows):
      raise ValueError(f"the Baseline was computed on other windows ({base.windows.shape} vs {wins.shape})")
    extra = 0.0
  else:
    base = baseline(model_fp, tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    extra = base.seconds
  stats = _batch_fn(model_q, chunk_tokens)
  t0 = time.perf_counter()
  parts, done, n_batches = [], 0, len(base.hidden)
  for i, win in enumerate(_batches(base.windows, base.batch_size)):
    out = jax.device_get(stats(base.hidden[i], base.classifier, base.logprobs[i], jnp.asarray(win)))
    parts.append(out)
    done += out["kl"].shape[0]
    if progress is not None:
      progress({"batch": i + 1, "batches": n_batches, "tokens": done, "seconds": time.perf_counter() - t0})
  per_token = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  result = summarize(per_token)
  result["seconds"] = time.perf_counter() - t0 + extra
  if return_per_token:
    result["per_token"] = per_token
  return result
