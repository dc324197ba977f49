"""What the pipeline says about odd data: undecodable bytes, a corpus of one file, a tokenizer trained on other data."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from cce_jax import data
from cce_jax.data import corpus as corpus_lib
from cce_jax.data import tokenizer as tokenizer_lib

TEXT = "def f(x):\n    return [x * i for i in range(10)]  # a comment\n" * 400


def _texts(folder, n=6):
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    with open(os.path.join(folder, f"doc{i}.txt"), "w", encoding="utf-8") as f:
      f.write(TEXT.replace("x", "xyz"[i % 3]))
  return os.path.join(folder, "*.txt")


def test_binary_data_warns_with_the_share_of_undecodable_bytes(tmp_path, caplog):
  (tmp_path / "text.txt").write_text("plain text " * 300)  # 3,300 bytes
  (tmp_path / "blob.bin").write_bytes(bytes([0xff, 0xfe, 0x80, 0x41]) * 275)  # 1,100 bytes, 825 undecodable
  files = [str(tmp_path / "text.txt"), str(tmp_path / "blob.bin")]
  with caplog.at_level(logging.WARNING):
    texts = corpus_lib.read_texts(files)
  assert "\ufffd" in texts[1]
  assert "18.8% of the 4,400 bytes read from 2 file(s) are not UTF-8 text" in caplog.text
  assert "blob.bin" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    corpus_lib.read_texts(files[:1])
  assert not caplog.text


def test_one_file_warns_that_there_is_no_validation_split(tmp_path, caplog):
  (tmp_path / "only.txt").write_text(TEXT)
  corpus = corpus_lib.get_corpus(str(tmp_path / "*.txt"))
  for val_fraction in (0.05, 0.999):  # wherever the hash puts it, the one file is for training
    with caplog.at_level(logging.WARNING):
      train, val = corpus_lib.split(corpus, val_fraction)
    assert (len(train), len(val)) == (1, 0)
    assert "is one file" in caplog.text and "no validation split" in caplog.text
    caplog.clear()
  with caplog.at_level(logging.WARNING):
    corpus_lib.split(corpus, 0.0)  # no validation asked for: nothing to say
  assert not caplog.text


@pytest.fixture(name="run_tokenizer")
def fixture_run_tokenizer(tmp_path):
  """A run's own tokenizer, prepared from one corpus at vocab_size 300."""
  glob = _texts(str(tmp_path / "first"))
  path = str(tmp_path / "run" / "tokenizer.json")
  corpus = data.prepare(glob, 300, str(tmp_path / "cache"), max_bytes=50_000, tokenizer_path=path)
  return glob, path, corpus


def test_the_tokenizer_records_what_it_was_trained_on(run_tokenizer, tmp_path):
  glob, path, corpus = run_tokenizer
  assert corpus.tokenizer_path == path and os.path.exists(path)
  record = tokenizer_lib.read_record(path)
  assert record["data"] == os.path.abspath(glob) and record["vocab_size"] == 300 and record["max_bytes"] == 50_000
  again = data.prepare(glob, 300, str(tmp_path / "cache"), max_bytes=50_000, tokenizer_path=path)  # a resumed run
  np.testing.assert_array_equal(again.train, corpus.train)


@pytest.mark.parametrize("other_data,vocab_size", [(True, 300), (False, 320)])
def test_a_tokenizer_trained_on_other_data_is_an_error_naming_both(run_tokenizer, tmp_path, other_data, vocab_size):
  glob, path, _ = run_tokenizer
  new_glob = _texts(str(tmp_path / "second")) if other_data else glob
  with pytest.raises(data.DataError) as info:
    data.prepare(new_glob, vocab_size, str(tmp_path / "cache"), max_bytes=50_000, tokenizer_path=path)
  message = str(info.value)
  assert f"was trained on data={os.path.abspath(glob)!r} with vocab_size=300" in message
  assert f"asks for data={os.path.abspath(new_glob)!r} with vocab_size={vocab_size}" in message
  assert "use a new workdir" in message and "\n" not in message


def test_a_tokenizer_without_a_record_is_used_with_a_warning(run_tokenizer, tmp_path, caplog):
  glob, path, corpus = run_tokenizer
  os.remove(tokenizer_lib.record_path(path))
  with caplog.at_level(logging.WARNING):
    again = data.prepare(glob, 300, str(tmp_path / "cache"), max_bytes=50_000, tokenizer_path=path)
  assert "does not record what it was trained on" in caplog.text
  np.testing.assert_array_equal(again.train, corpus.train)


def test_a_trained_tokenizer_is_saved_with_its_record_and_no_temporaries(tmp_path):
  path = str(tmp_path / "tok.json")
  tokenizer_lib.load_or_train(path, lambda: [TEXT], 280, {"data": "d", "vocab_size": 280})
  with open(tokenizer_lib.record_path(path), encoding="utf-8") as f:
    assert json.load(f) == {"data": "d", "vocab_size": 280}
  assert sorted(os.listdir(tmp_path)) == ["tok.json", "tok.trained_on.json"]  # no temporaries left
