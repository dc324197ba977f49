"""experiments/compare_runs.py: the table of validation losses and the plot from run directories."""

from __future__ import annotations

import json
import os
import sys

from absl import app
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import compare_runs  # noqa: E402  pylint: disable=wrong-import-position


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
  runs = compare_runs.parse_runs([f"fused={a}", f"naive={b}"])
  text = compare_runs.table(runs, tail=2)
  assert "| fused | 4.5000 | 2.5000 | 2.5000 | 3,000 |" in text
  assert "| naive | - | 3.7500 | 3.7500 | 3,000 |" in text
  pytest.importorskip("matplotlib")
  path = compare_runs.plot(runs, str(tmp_path / "c.png"), smooth=2)
  assert os.path.getsize(path) > 0


def test_bad_runs(tmp_path):
  with pytest.raises(app.UsageError, match="LABEL=WORKDIR"):
    compare_runs.parse_runs(["nolabel"])
  with pytest.raises(app.UsageError, match="no metrics"):
    compare_runs.parse_runs([f"x={tmp_path}"])
