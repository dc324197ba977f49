"""Byte-level BPE tokenizer trained locally with `tokenizers`, cached on disk by corpus and vocabulary size.

Beside each saved tokenizer `NAME.json` lies `NAME.trained_on.json`: what it was trained on (the data spec, the
vocabulary size, the byte budget, the validation fraction, the corpus fingerprint). `check_trained_on` compares the
data spec and vocabulary size with a run's config, so that a run directory's tokenizer is never reused for other
data silently.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

from cce_jax.data.errors import DataError

EOS = "<|endoftext|>"
CHECKED = ("data", "vocab_size")  # the record's fields a reused tokenizer must match


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


def record_path(path: str) -> str:
  """Where the record of what the tokenizer at `path` was trained on lies."""
  return os.path.splitext(path)[0] + ".trained_on.json"


def read_record(path: str) -> dict | None:
  """The record of the tokenizer at `path`, or None (saved before tokenizers kept one)."""
  try:
    with open(record_path(path), encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _write_atomic(path: str, write):
  """Writes through a unique temporary file and a rename: concurrent or killed writers never leave half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _save_record(path: str, trained_on: dict | None):
  if trained_on is not None:
    _write_atomic(record_path(path), lambda tmp: _dump_json(trained_on, tmp))


def _dump_json(obj, path):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)


def load_or_train(path: str, texts_fn, vocab_size: int, trained_on: dict | None = None):
  """The tokenizer at `path` if it exists, else trained on texts_fn() and saved there with the record `trained_on`.

  A small corpus can give fewer than `vocab_size` entries (BPE runs out of merges); ids stay below vocab_size.
  """
  if os.path.exists(path):
    return load(path)
  tok = train(texts_fn(), vocab_size)
  _save_record(path, trained_on)  # first: a tokenizer without its record reads as an old one, never as a wrong one
  _write_atomic(path, tok.save)
  return tok


def copy(src: str, dst: str, trained_on: dict):
  """Copies the tokenizer at src to dst with the record `trained_on`."""
  _save_record(dst, trained_on)
  _write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def check_trained_on(path: str, trained_on: dict):
  """DataError naming both when the tokenizer at `path` was recorded with another data spec or vocabulary size
  than `trained_on`; a warning when it has no record."""
  record = read_record(path)
  if record is None:
    logging.warning("%s does not record what it was trained on (saved by an older version); using it for "
                    "data=%r, vocab_size=%s as is", path, trained_on["data"], trained_on["vocab_size"])
    return
  if any(record.get(k) != trained_on[k] for k in CHECKED):
    raise DataError(
        f"{path} was trained on data={record.get('data')!r} with vocab_size={record.get('vocab_size')}, but the "
        f"config asks for data={trained_on['data']!r} with vocab_size={trained_on['vocab_size']}: the tokenizer and "
        f"the checkpoints beside it belong to the old data; use a new workdir for this data, or delete the old "
        f"one to start over")
