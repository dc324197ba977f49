"""Text corpora: the running Python's standard-library sources (no download), or the user's files.

`text_source` turns a config's `data` string into (fingerprint, train texts, validation texts). The default
corpus exists on any machine with Python: the `.py` files of the standard library (test suites and
site-packages left out). Files are split into train and validation by a hash of their path relative to the
corpus root, so the split is the same on every run and does not depend on file order; files are never cut, so
a corpus of one file has no validation split (a warning says so). Files are read as UTF-8; undecodable bytes
become U+FFFD, and a warning gives their share (a binary file is not a text corpus).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import sysconfig

from cce_jax.data.errors import DataError

STDLIB = "stdlib"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A list of text files with a root (paths are reported relative to it)."""

  root: str
  files: tuple[str, ...]

  def fingerprint(self) -> str:
    """Changes when any file's relative path, size or modification time changes."""
    h = hashlib.sha256()
    for f in self.files:
      st = os.stat(f)
      h.update(f"{os.path.relpath(f, self.root)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def stdlib_corpus() -> Corpus:
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idle_test", "__pycache__"))
    files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  if not files:
    raise FileNotFoundError(f"no .py files under the standard library at {root}")
  return Corpus(root=root, files=tuple(files))


def glob_corpus(pattern: str) -> Corpus:
  files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
  if not files:
    raise DataError(f"config.data={pattern!r} matches no files")
  return Corpus(root=os.path.commonpath([os.path.dirname(f) for f in files]), files=tuple(files))


def get_corpus(spec: str) -> Corpus:
  """"stdlib" or a glob of text files ("~/text/**/*.txt")."""
  return stdlib_corpus() if spec == STDLIB else glob_corpus(spec)


def split(corpus: Corpus, val_fraction: float) -> tuple[list[str], list[str]]:
  """(train files, validation files) by a hash of each relative path; both non-empty when possible (training
  first), with a warning when val_fraction > 0 yet the validation split is empty (a corpus of one file)."""
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  train, val = [], []
  for f in corpus.files:
    digest = hashlib.sha256(os.path.relpath(f, corpus.root).encode()).digest()
    (val if int.from_bytes(digest[:8], "little") / 2**64 < val_fraction else train).append(f)
  if not train and val:
    train.append(val.pop())
  if val_fraction > 0 and not val and len(train) > 1:
    val.append(train.pop())
  if val_fraction > 0 and not val:
    logging.warning("the corpus is one file (%s): files are split whole between training and validation, so there "
                    "is no validation split and no validation loss; give several files (or val_fraction=0 to "
                    "silence this)", train[0])
  return train, val


def text_source(spec: str, val_fraction: float, max_bytes: int | None):
  """(fingerprint, train_texts_fn, val_texts_fn) for "stdlib", a glob, or "hf:NAME[:SPLIT[:COLUMN]]"."""
  budget = None if max_bytes is None else int(max_bytes * (1 - val_fraction))
  vbudget = None if max_bytes is None else max(1, int(max_bytes * val_fraction))
  if spec.startswith("hf:"):
    return _hf_source(spec, val_fraction, budget, vbudget)
  corpus = get_corpus(spec)
  train, val = split(corpus, val_fraction)
  return corpus.fingerprint(), lambda: read_texts(train, budget), lambda: read_texts(val, vbudget)


def _hf_source(spec, val_fraction, budget, vbudget):
  name, split_name, column = (spec[3:].split(":") + ["train", "text"])[:3]

  def texts(want_val, limit):
    try:
      import datasets  # pylint: disable=import-outside-toplevel
    except ImportError as err:
      raise ImportError(f"config.data={spec!r} needs the `datasets` package (pip install datasets) and network "
                        "access; or point config.data at local text files") from err
    rows = datasets.load_dataset(name, split=split_name, streaming=True)
    out, total = [], 0
    for i, row in enumerate(rows):
      if limit is not None and total >= limit:
        break
      digest = hashlib.sha256(f"{name}/{split_name}/{i}".encode()).digest()
      if (int.from_bytes(digest[:8], "little") / 2**64 < val_fraction) == want_val:
        out.append(row[column])
        total += len(row[column].encode())
    return out

  return hashlib.sha256(spec.encode()).hexdigest()[:16], lambda: texts(False, budget), lambda: texts(True, vbudget)


def read_texts(files, max_bytes: int | None = None) -> list[str]:
  """The files' texts (UTF-8, undecodable bytes replaced), stopping once max_bytes are read; a warning gives the
  share of undecodable bytes, if any, and the file with the most."""
  texts, total, bad, worst = [], 0, 0, (0, "")
  for f in files:
    if max_bytes is not None and total >= max_bytes:
      break
    with open(f, "rb") as fh:
      data = fh.read()
    total += len(data)
    try:
      texts.append(data.decode("utf-8"))
    except UnicodeDecodeError:
      texts.append(data.decode("utf-8", errors="replace"))
      n = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
      bad, worst = bad + n, max(worst, (n, f))
  if bad:
    logging.warning("%.1f%% of the %s bytes read from %d file(s) are not UTF-8 text (replaced by U+FFFD; most in %s): "
                    "config.data should name text files", 100 * bad / total, f"{total:,}", len(texts), worst[1])
  return texts
