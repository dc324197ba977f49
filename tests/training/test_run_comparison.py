"""Comparing runs (experiments/compare_runs.py's library side): the table of validation losses and the plot."""

from __future__ import annotations

import json
import os

import pytest

from cce_jax.training import metrics


def _run(tmp_path, name, losses, val):
  folder = tmp_path / name / "metrics"
  folder.mkdir(parents=True)
  with open(folder / "metrics.jsonl", "w") as f:
    for step, loss in enumerate(losses, 1):
      record = {"step": step, "loss": loss, "tokens_per_s": 1000.0 * step}
      if step in val:
        record["val_loss"] = val[step]
      f.write(json.dumps(record) + "\n")
  return str(tmp_path / name)


def test_table_and_plot(tmp_path):
  a = _run(tmp_path, "a", [5.0, 4.0, 3.0, 2.0], {2: 4.5, 4: 2.5})
  b = _run(tmp_path, "b", [5.0, 4.5, 4.0, 3.5], {4: 3.75})
  runs = metrics.load_runs([f"fused={a}", f"naive={b}"])
  text = metrics.comparison_table(runs, tail=2)
  assert "| fused | 4.5000 | 2.5000 | 2.5000 | 3,000 |" in text
  assert "| naive | - | 3.7500 | 3.7500 | 3,000 |" in text
  path = metrics.plot_comparison(runs, str(tmp_path / "c.png"), smooth=2)
  assert os.path.getsize(path) > 0


def test_bad_runs(tmp_path):
  with pytest.raises(ValueError, match="LABEL=WORKDIR"):
    metrics.load_runs(["nolabel"])
  with pytest.raises(ValueError, match="no metrics"):
    metrics.load_runs([f"x={tmp_path}"])
