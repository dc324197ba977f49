"""The README's example runs, and its test command is the one CI runs."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_COMMAND = ".venv/bin/python -m pytest -n 2 -q tests"


def _readme():
  return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
  assert blocks, "the README has no python example"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used


def test_ci_runs_the_readme_test_command():
  assert TEST_COMMAND in _readme()
  assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  assert "experiments/train.py --config=experiments/configs/tiny.py" in _readme()
