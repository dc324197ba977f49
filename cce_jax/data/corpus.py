"""Text corpora: the running Python's standard-library sources (no download), or the user's files.

The default corpus exists on any machine with Python: the `.py` files of the standard library (test suites and
site-packages left out). Files are split into train and validation by a hash of their path relative to the
corpus root, so the split is the same on every run and does not depend on file order.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sysconfig

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
    raise FileNotFoundError(f"config.data={pattern!r} matches no files")
  return Corpus(root=os.path.commonpath([os.path.dirname(f) for f in files]), files=tuple(files))


def get_corpus(spec: str) -> Corpus:
  """"stdlib" or a glob of text files ("~/text/**/*.txt")."""
  return stdlib_corpus() if spec == STDLIB else glob_corpus(spec)


def split(corpus: Corpus, val_fraction: float) -> tuple[list[str], list[str]]:
  """(train files, validation files) by a hash of each relative path; both non-empty when possible."""
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  train, val = [], []
  for f in corpus.files:
    digest = hashlib.sha256(os.path.relpath(f, corpus.root).encode()).digest()
    (val if int.from_bytes(digest[:8], "little") / 2**64 < val_fraction else train).append(f)
  if val_fraction > 0 and not val and len(train) > 1:
    val.append(train.pop())
  return train, val


def read_texts(files, max_bytes: int | None = None) -> list[str]:
  """The files' texts (UTF-8, undecodable bytes replaced), stopping once max_bytes are read."""
  texts, total = [], 0
  for f in files:
    if max_bytes is not None and total >= max_bytes:
      break
    with open(f, "rb") as fh:
      data = fh.read()
    total += len(data)
    texts.append(data.decode("utf-8", errors="replace"))
  return texts
