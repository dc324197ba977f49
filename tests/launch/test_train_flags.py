"""experiments/train.py's checks for multi-host runs: a --workdir URL that Orbax cannot write to, and a bad
JAX_NUM_PROCESSES, end the run before it starts with one line (the process count and id from the environment run
in test_multiprocess.py; gs:// URLs in tests/training/test_checkpoint_urls.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("workdir, env, message", [
    ("s3://bucket/run", {}, "--workdir=s3://bucket/run: checkpoints go to a path"),
    ("{tmp}/run", {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not a non-negative integer"),
])
def test_one_line_errors(workdir, env, message, tmp_path):
  out = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"),
                        f"--config={ROOT / 'experiments' / 'configs' / 'tiny.py'}",
                        f"--workdir={workdir.format(tmp=tmp_path)}", "--distributed"],
                       env=dict(os.environ, JAX_PLATFORMS="cpu", **env), capture_output=True, text=True, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
  assert not (tmp_path / "run").exists()
