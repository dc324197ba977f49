"""experiments/quantize.py end to end on a tiny train.py run: results.json rows, results.md, the plot, one progress
line per recipe; the library side (rows, bits per weight) in-process; one-line usage errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from cce_jax.quant import eval_recipes
from cce_jax.quant import eval_sources
from cce_jax.training import config as config_lib
from cce_jax.training import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "quantize.py"
FIELDS = {"recipe", "perplexity", "kl", "top1_agreement", "bits_per_weight", "seconds"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny run (D=128, L=1, V=320, 8 steps) on 100 kB of the standard library: seconds on CPU."""
  tmp = tmp_path_factory.mktemp("run")
  cfg = config_lib.base_config()
  cfg.update(dict(data_cache=str(tmp / "cache"), max_bytes=100_000, vocab_size=320, seq_len=32, batch_size=8,
                  steps=8, checkpoint_every=8, eval_every=0, plot=False))
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
  assert 0 <= int8["kl"] < int4["kl"] and int8["top1_agreement"] >= int4["top1_agreement"]
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
      "(or 'all')"]
  with pytest.raises(FileNotFoundError, match="not a train.py run directory"):
    eval_sources.from_workdir(str(tmp_path))
  with pytest.raises(ValueError, match="no recipe"):
    eval_recipes.resolve(" , ")
  assert eval_recipes.resolve("all") == ["int8", "int4_g128", "uint4_g128", "fp8_e4m3", "mxfp4", "nvfp4", "nf4"]
