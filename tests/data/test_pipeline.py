"""Corpus split, tokenizer, packed batches and their resumable state."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cce_jax import data
from cce_jax.data import corpus as corpus_lib
from cce_jax.data import tokenizer as tokenizer_lib


def test_stdlib_split_is_deterministic_and_disjoint():
  corpus = corpus_lib.stdlib_corpus()
  assert len(corpus.files) > 100 and all(f.endswith(".py") for f in corpus.files)
  assert not any(f"{os.sep}test{os.sep}" in f or "site-packages" in f for f in corpus.files)
  train, val = corpus_lib.split(corpus, 0.05)
  assert (train, val) == corpus_lib.split(corpus, 0.05)
  assert not set(train) & set(val) and sorted(train + val) == sorted(corpus.files)
  assert 0.02 < len(val) / len(corpus.files) < 0.1


def test_glob_corpus(tmp_path):
  for i in range(3):
    (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
  corpus = corpus_lib.get_corpus(str(tmp_path / "*.txt"))
  assert len(corpus.files) == 3
  with pytest.raises(data.DataError, match="matches no files"):
    corpus_lib.get_corpus(str(tmp_path / "*.md"))


def test_tokenizer_round_trip_and_cache(tmp_path):
  texts = corpus_lib.read_texts(corpus_lib.stdlib_corpus().files[:20])
  path = str(tmp_path / "tok.json")
  tok = tokenizer_lib.load_or_train(path, lambda: texts, 400)
  assert tok.get_vocab_size() == 400 and os.path.exists(path)
  sample = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
  assert tok.decode(tok.encode(sample).ids) == sample
  again = tokenizer_lib.load_or_train(path, lambda: pytest.fail("must load the cached tokenizer"), 400)
  assert again.encode(sample).ids == tok.encode(sample).ids
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train(texts, 100)


@pytest.fixture(scope="module")
def stream():
  rng = np.random.default_rng(0)
  return rng.integers(0, 1000, size=5003).astype(np.uint32)


def test_batches_pack_shift_and_cover_an_epoch(stream):
  b = data.Batches(stream, seq_len=16, batch_size=8, seed=1)
  assert b.batches_per_epoch == (5002 // 16) // 8
  seen = []
  for _ in range(b.batches_per_epoch):
    batch = next(b)
    assert batch["inputs"].shape == (8, 16) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    seen += [tuple(row) for row in batch["inputs"]]
  assert len(set(seen)) == len(seen)  # no sequence twice in an epoch
  assert b.state() == {"epoch": 0, "step": b.batches_per_epoch}
  next(b)
  assert b.state() == {"epoch": 1, "step": 1}


def test_batches_are_deterministic_and_resume_exactly(stream):
  a = data.Batches(stream, 16, 8, seed=3)
  expected = [next(a) for _ in range(50)]  # crosses epochs
  b = data.Batches(stream, 16, 8, seed=3)
  for _ in range(17):
    next(b)
  state = b.state()
  c = data.Batches(stream, 16, 8, seed=3)
  c.restore(state)
  for want in expected[17:]:
    got = next(c)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
  other = next(data.Batches(stream, 16, 8, seed=4))
  assert not np.array_equal(other["inputs"], expected[0]["inputs"])


def test_too_little_data_is_an_error():
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.Batches(np.arange(100, dtype=np.uint32), seq_len=16, batch_size=8, seed=0)


def test_prepare_caches_and_reuses(tmp_path):
  first = data.prepare("stdlib", 300, str(tmp_path), max_bytes=200_000)
  assert first.train.dtype == np.uint32 and len(first.train) > 10_000 and len(first.val) > 100
  assert first.train.max() < 300
  second = data.prepare("stdlib", 300, str(tmp_path), max_bytes=200_000)
  np.testing.assert_array_equal(first.train, second.train)
  assert first.tokenizer_path == second.tokenizer_path


def test_hugging_face_source_without_datasets_is_a_clear_error():
  try:
    import datasets  # pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("datasets is installed")
  except ImportError:
    pass
  _, train_texts, _ = corpus_lib.text_source("hf:some/dataset", 0.05, None)
  with pytest.raises(ImportError, match="needs the `datasets` package"):
    train_texts()
