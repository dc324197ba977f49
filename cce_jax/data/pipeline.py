"""Tokenised corpus -> packed fixed-length sequences -> deterministic, resumable batches.

Documents are joined with EOS into one token stream per split. Sequence i of a split is the window
tokens[i·T : i·T + T + 1] (inputs are its first T tokens, targets its last T). Each epoch visits the sequences in
the order of a permutation drawn from (seed, epoch); the iterator's whole state is {"epoch", "step"} (batches
drawn in this epoch), so a run restored from a checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np

from cce_jax.data import corpus as corpus_lib
from cce_jax.data import tokenizer as tokenizer_lib
from cce_jax.data.errors import DataError


@dataclasses.dataclass
class TokenisedCorpus:
  train: np.ndarray  # [tokens] uint32
  val: np.ndarray
  tokenizer_path: str
  vocab_size: int


def prepare(data: str, vocab_size: int, cache_dir: str, *, val_fraction: float = 0.05,
            max_bytes: int | None = None, tokenizer_path: str | None = None) -> TokenisedCorpus:
  """Tokenises the corpus `data`, training or reusing the cached tokenizer.

  data: "stdlib", a glob of text files, or "hf:NAME[:SPLIT[:COLUMN]]" (a Hugging Face dataset; needs the
  `datasets` package and network access). max_bytes bounds the text read (train and validation together).
  Cached under cache_dir by (corpus fingerprint, vocab_size, val_fraction, max_bytes, tokenizer): tokenizer.json
  and the token streams as .npy.
  tokenizer_path: a run's own copy of its tokenizer. If it exists it is used (a resumed run tokenises exactly as
  before even if the cache is gone) once `tokenizer.check_trained_on` has found it trained on this `data` at this
  `vocab_size` (DataError naming both otherwise); if not, the tokenizer is copied there with its record.
  """
  fingerprint, train_texts, val_texts = corpus_lib.text_source(data, val_fraction, max_bytes)
  trained_on = {"data": _normalise(data), "vocab_size": vocab_size, "max_bytes": max_bytes,
                "val_fraction": val_fraction, "corpus_fingerprint": fingerprint}
  own = tokenizer_path if tokenizer_path and os.path.exists(tokenizer_path) else None
  if own:
    tokenizer_lib.check_trained_on(own, trained_on)
  key = hashlib.sha256(json.dumps([fingerprint, vocab_size, val_fraction, max_bytes,
                                   _file_digest(own) if own else None]).encode())
  folder = os.path.join(os.path.expanduser(cache_dir), key.hexdigest()[:16])
  tok_path = own or os.path.join(folder, "tokenizer.json")
  train_texts = functools.cache(train_texts)  # read once for the tokenizer and the token stream
  tok = tokenizer_lib.load_or_train(tok_path, train_texts, vocab_size, trained_on)
  if tokenizer_path and not own:
    tokenizer_lib.copy(tok_path, tokenizer_path, trained_on)
  streams = {}
  for name, texts in (("train", train_texts), ("val", val_texts)):
    path = os.path.join(folder, f"{name}.npy")
    if not os.path.exists(path):
      os.makedirs(folder, exist_ok=True)
      tmp = f"{path}.tmp{os.getpid()}.npy"
      np.save(tmp, encode(tok, texts()))
      os.replace(tmp, path)  # atomic: concurrent or killed runs never leave half a file
    streams[name] = np.load(path, mmap_mode="r")
  return TokenisedCorpus(train=streams["train"], val=streams["val"], tokenizer_path=tokenizer_path or tok_path,
                         vocab_size=vocab_size)


def _normalise(data: str) -> str:
  """The data spec as recorded: a glob of files as an absolute pattern, "stdlib" and "hf:..." as given."""
  if data == corpus_lib.STDLIB or data.startswith("hf:"):
    return data
  return os.path.abspath(os.path.expanduser(data))


def _file_digest(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def encode(tok, texts) -> np.ndarray:
  """One uint32 stream: each text's ids followed by EOS."""
  eos = tok.token_to_id(tokenizer_lib.EOS)
  parts = []
  for enc in tok.encode_batch(texts):
    parts.append(np.asarray(enc.ids, np.uint32))
    parts.append(np.asarray([eos], np.uint32))
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint32)


class Batches:
  """Deterministic batches {"inputs", "targets"}: int32 [batch_size, seq_len], drawn without replacement per epoch.

  Each epoch drops the sequences that do not fill a last batch. `state()` / `restore(state)` save and set the
  position; iterating never ends (epochs follow each other).
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
    self.num_sequences = max(0, (len(tokens) - 1) // seq_len)
    self.batches_per_epoch = self.num_sequences // batch_size
    if self.batches_per_epoch < 1:
      raise DataError(f"{len(tokens)} tokens give {self.num_sequences} sequences of {seq_len + 1} tokens: fewer "
                      f"than one batch of {batch_size}; use more data, a shorter seq_len or a smaller batch")
    self.epoch, self.step = 0, 0
    self._order = None

  def state(self) -> dict:
    return {"epoch": self.epoch, "step": self.step}

  def restore(self, state: dict):
    self.epoch, self.step = int(state["epoch"]), int(state["step"])
    self._order = None

  def _epoch_order(self):
    if self._order is None or self._order[0] != self.epoch:
      rng = np.random.default_rng([self.seed, self.epoch])
      self._order = (self.epoch, rng.permutation(self.num_sequences))
    return self._order[1]

  def __iter__(self):
    return self

  def __next__(self):
    if self.step >= self.batches_per_epoch:
      self.epoch, self.step = self.epoch + 1, 0
    ids = self._epoch_order()[self.step * self.batch_size:(self.step + 1) * self.batch_size]
    self.step += 1
    return _batch(self.tokens, ids, self.seq_len)


def _batch(tokens, sequence_ids, seq_len):
  """{"inputs", "targets"} int32 [len(sequence_ids), seq_len]: sequence i is tokens[i·T : i·T + T + 1]."""
  windows = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in sequence_ids * seq_len]).astype(np.int32)
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None):
  """The validation stream in order: consecutive batches, the same every time."""
  n = max(0, (len(tokens) - 1) // seq_len) // batch_size
  for b in range(n if max_batches is None else min(n, max_batches)):
    yield _batch(tokens, np.arange(batch_size) + b * batch_size, seq_len)
