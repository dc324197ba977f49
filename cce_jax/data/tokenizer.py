"""Byte-level BPE tokenizer trained locally with `tokenizers`, cached on disk by corpus and vocabulary size."""

from __future__ import annotations

import os

EOS = "<|endoftext|>"


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as err:  # pragma: no cover - a declared dependency
    raise ImportError("the data pipeline needs `tokenizers` (pip install tokenizers)") from err
  return tokenizers


def train(texts, vocab_size: int):
  """A byte-level BPE tokenizer with `vocab_size` entries (EOS included) trained on the texts."""
  tk = _tokenizers()
  if vocab_size < 257 + 1:
    raise ValueError(f"vocab_size must be >= 258 (256 bytes, EOS and one merge), got {vocab_size}")
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                   initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def load(path: str):
  return _tokenizers().Tokenizer.from_file(path)


def load_or_train(path: str, texts_fn, vocab_size: int):
  """The tokenizer at `path` if it exists, else trained on texts_fn() and saved there.

  A small corpus can give fewer than `vocab_size` entries (BPE runs out of merges); ids stay below vocab_size.
  """
  if os.path.exists(path):
    return load(path)
  tok = train(texts_fn(), vocab_size)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)  # atomic: a concurrent or killed run never leaves half a file
  return tok
