"""A `tokenizers` byte-level BPE tokenizer from a GGUF file's tokenizer.ggml.* metadata (the "gpt2" model)."""

from __future__ import annotations

import tokenizers
from tokenizers import decoders
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

# llama.cpp's token types (llama_token_type): 3 = control (e.g. <|im_start|>), 4 = user-defined.
_SPECIAL_TYPES = (3, 4)
# Pre-tokenizer names (tokenizer.ggml.pre) that split digits one by one before the GPT-2 regex (as llama.cpp does).
_DIGIT_SPLITTING = ("smollm",)


def _strings(reader, key):
  field = reader.fields.get(key)
  return [] if field is None else list(field.contents())


def tokenizer_from_gguf_fields(reader) -> tokenizers.Tokenizer:
  """Byte-level BPE from `reader.fields` (a gguf.GGUFReader): tokens, merges, token types, special token ids.

  Control and user-defined tokens become special tokens (kept whole when encoding, skipped by
  `decode(..., skip_special_tokens=True)`). No BOS is added (GGUF's add_bos_token is honoured by the caller).
  """
  model = reader.fields.get("tokenizer.ggml.model")
  kind = model.contents() if model is not None else None
  if kind != "gpt2":
    raise NotImplementedError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
  tokens = _strings(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _strings(reader, "tokenizer.ggml.merges")]
  types = _strings(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tok = tokenizers.Tokenizer(tok_models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  pre = reader.fields.get("tokenizer.ggml.pre")
  if pre is not None and pre.contents() in _DIGIT_SPLITTING:
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  special = [tokenizers.AddedToken(t, special=True, normalized=False)
             for t, kind in zip(tokens, types) if int(kind) in _SPECIAL_TYPES]
  tok.add_special_tokens(special)
  return tok
