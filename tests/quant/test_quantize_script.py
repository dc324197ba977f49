"""experiments/quantize.py end to end on a tiny train.py run: results.json rows, results.md, the plot, one progress
line per recipe; the library side (rows, bits per weight) in-process; one-line usage errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cce_jax import quant
from cce_jax.quant import calib_recipes
from cce_jax.quant import eval_recipes
from cce_jax.quant import eval_sources
from cce_jax.quant import recipes
from cce_jax.training import config as config_lib
from cce_jax.training import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "quantize.py"
FIELDS = {"recipe", "perplexity", "kl", "top1_agreement", "bits_per_weight", "seconds"}


def _write_corpus(folder, files=60, words=300):
  """Text files of words drawn from a small word list (a Zipf-like law): a corpus the tokenizer learns in ms."""
  rng = np.random.default_rng(0)
  vocab = ["".join(rng.choice(list("etaoinshrdlucmfw"), rng.integers(2, 8))) for _ in range(200)]
  p = 1 / np.arange(1, 201)
  folder.mkdir()
  for i in range(files):
    (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(vocab, words, p=p / p.sum())) + "\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny run (D=128, L=1, V=320, 8 steps) on a small generated corpus: seconds on CPU."""
  tmp = tmp_path_factory.mktemp("run")
  _write_corpus(tmp / "corpus")
  cfg = config_lib.base_config()
  cfg.update(dict(data=str(tmp / "corpus" / "*.txt"), data_cache=str(tmp / "cache"), val_fraction=0.1,
                  vocab_size=320, seq_len=32, batch_size=8, steps=8, checkpoint_every=8, eval_every=0, plot=False))
  cfg.model.update(D=128, H=2, KV=1, L=1, F=128, dtype="float32")
  cfg.optim.update(warmup_steps=2)
  trainer.train(cfg, str(tmp / "run"))
  return tmp / "run"


def _run(*args):
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)


def test_script_writes_results_with_a_line_per_recipe(workdir, tmp_path):
  out = tmp_path / "quant"
  proc = _run(f"--workdir={workdir}", "--recipes=int8,int4_g128", f"--out={out}", "--eval_tokens=256")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
  assert [line.split(":")[0] for line in lines] == ["[0/2] fp (baseline)", "[1/2] int8", "[2/2] int4_g128"]
  rows = json.loads((out / "results.json").read_text())["rows"]
  assert [r["recipe"] for r in rows] == [eval_recipes.BASELINE, "int8", "int4_g128"]
  assert all(FIELDS <= set(r) for r in rows) and rows[1]["tokens"] == 256
  base, int8, int4 = rows
  assert base["kl"] == 0 and base["bits_per_weight"] == 32 and base["top1_agreement"] == 1
  assert 8 < int8["bits_per_weight"] < 8.5 and 4 < int4["bits_per_weight"] < 4.6
  assert -1e-6 <= int8["kl"] < int4["kl"]  # float rounding: a KL near 0 may print as -3e-9
  assert int8["top1_agreement"] >= int4["top1_agreement"]
  assert abs(int8["perplexity"] / base["perplexity"] - 1) < 0.01
  md = (out / "results.md").read_text()
  assert "| int4_g128 |" in md and "commit" in md
  assert (out / "perplexity_vs_bits.png").stat().st_size > 1000


def test_workdir_source_holds_out_the_validation_split(workdir):
  source = eval_sources.from_workdir(str(workdir), max_tokens=100)
  assert source.seq_len == 32 and len(source.tokens) == 101 and "step 8" in source.description


def test_usage_errors_are_one_line(tmp_path):
  proc = _run(f"--workdir={tmp_path}", "--recipes=int8,int5", f"--out={tmp_path / 'o'}")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "quantize.py: error: unknown recipe 'int5'; known: int8, int4_g128, uint4_g128, fp8_e4m3, mxfp4, nvfp4, nf4 "
      "(or 'all'); calibrated: " + ", ".join(calib_recipes.names())]
  with pytest.raises(FileNotFoundError, match="not a train.py run directory"):
    eval_sources.from_workdir(str(tmp_path))
  with pytest.raises(ValueError, match="no recipe"):
    eval_recipes.resolve(" , ")
  assert eval_recipes.resolve("all") == ["int8", "int4_g128", "uint4_g128", "fp8_e4m3", "mxfp4", "nvfp4", "nf4"]


def test_group_size_that_does_not_divide_falls_back_to_a_divisor():
  w = lambda *shape: np.ones(shape, np.float32)  # pylint: disable=unnecessary-lambda-assignment
  params = {"blocks": {"0": {"attn": {"wq": w(576, 3, 64), "wk": w(576, 1, 64), "wv": w(576, 1, 64),
                                      "wo": w(3, 64, 576)},
                             "mlp": {"w1": w(576, 256), "w3": w(576, 256), "w2": w(256, 576)}}}}
  rules, notes = eval_recipes.fitted_rules(params, "int4_g128")
  q = quant.quantize_params(params, rules)["blocks"]["0"]
  assert q["attn"]["wq"].group_size == 96 and q["mlp"]["w1"].group_size == 96  # 576 = 6 · 96
  assert q["mlp"]["w2"].group_size == 128 and q["attn"]["wo"].group_size == "channel"  # 256; wo clipped to 64
  assert len(notes) == 2 and all("groups of 96, since 128 does not divide 576" in n for n in notes)
  assert eval_recipes.fitted_rules(params, "nf4") == (recipes.get("nf4"), [])
  row = {"recipe": "int4_g128", "perplexity": 2.0, "perplexity_change": 0.01, "kl": 0.1, "kl_median": 0.1,
         "kl_p99": 0.2, "kl_max": 0.3, "top1_agreement": 0.9, "delta_p_rms": 0.01, "bits_per_weight": 4.3,
         "bits_per_weight_all": 9.0, "seconds": 1.0, "notes": notes}
  md = eval_recipes.markdown([row], {"model": "m"})
  assert md.count("| int4_g128 | 4.300 |") == 1 and "- int4_g128: `blocks/" in md


def test_script_runs_calibrated_recipes_on_unscored_held_out_tokens(workdir, tmp_path):
  out = tmp_path / "calibrated"
  proc = _run(f"--workdir={workdir}", "--recipes=rtn_w4_g128,gptq_w4_g128", f"--out={out}", "--eval_tokens=256",
              "--calib_tokens=256")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "256 held-out tokens that are not scored" in proc.stdout
  data = json.loads((out / "results.json").read_text())
  rows = data["rows"]
  assert [r["recipe"] for r in rows] == [eval_recipes.BASELINE, "rtn_w4_g128", "gptq_w4_g128"]
  rtn, gptq = rows[1:]
  assert rtn["tokens"] == gptq["tokens"] == 256 and rtn["bits_per_weight"] == gptq["bits_per_weight"]
  assert 0 < gptq["kl"] < 1 and 0 < rtn["kl"] < 1
  assert data["meta"]["calibration"].startswith("256 ")


def test_calibration_tokens_are_never_scored():
  stream = np.arange(1000)
  scored, calib = calib_recipes.split_calibration(stream, 256, 300)
  assert list(scored) == list(range(257)) and list(calib) == list(range(257, 557))
  scored, calib = calib_recipes.split_calibration(stream, None, 300)
  assert len(scored) == 700 and list(calib) == list(range(700, 1000))
  with pytest.raises(ValueError, match="only 199 of the 300 calibration tokens"):
    calib_recipes.split_calibration(stream, 800, 300)
  with pytest.raises(ValueError, match="needs calibration tokens"):
    eval_recipes.compare(None, stream, ["gptq_w4_g128"])
  assert calib_recipes.needs_calibration("awq_w3_g128") and not calib_recipes.needs_calibration("rtn_w3_g128")
