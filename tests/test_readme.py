"""The README's and the docs' examples run, their links resolve, and the README's test command is the one CI runs."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_COMMAND = ".venv/bin/python -m pytest -n 2 -q tests"
# Pages whose python examples run here, whose lines stay within 120 characters and whose length is capped.
PAGES = {"README.md": 120, "BENCHMARKS.md": 300, "docs/README.md": None, "docs/linear_cross_entropy.md": None,
         "docs/filtering.md": None, "docs/sharding.md": None, "docs/scaling.md": None,
         "docs/benchmark_log.md": None, "docs/quantization.md": None, "docs/launch.md": None}
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _text(page):
  return (ROOT / page).read_text(encoding="utf-8")


def _markdown_pages():
  return ["README.md", "BENCHMARKS.md", "REPRODUCTIONS.md"] + sorted(
      str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def test_readme_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", _text("README.md"), flags=re.S)
  assert blocks, "the README has no python example"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used


@pytest.mark.parametrize("page", ["docs/linear_cross_entropy.md", "docs/sharding.md", "docs/scaling.md",
                                  "docs/quantization.md"])
def test_docs_examples_run(page):
  blocks = re.findall(r"```python\n(.*?)```", _text(page), flags=re.S)
  assert blocks, f"{page} has no python example"
  for block in blocks:
    exec(compile(block, page, "exec"), {})  # pylint: disable=exec-used


def test_ci_runs_the_readme_test_command():
  assert TEST_COMMAND in _text("README.md")
  assert TEST_COMMAND in _text(".ci/run")
  assert "experiments/train.py --config=experiments/configs/tiny.py" in _text("README.md")


@pytest.mark.parametrize("page", _markdown_pages())
def test_relative_links_resolve(page):
  missing = []
  for target in _LINK.findall(_text(page)):
    if re.match(r"[a-z]+://|mailto:|#", target):
      continue
    path = (ROOT / page).parent / target.split("#", 1)[0]
    if not path.exists():
      missing.append(target)
  assert not missing, f"{page} links to missing files: {missing}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_pages_are_short_and_narrow(page):
  lines = _text(page).splitlines()
  long = [i for i, line in enumerate(lines, 1) if len(line) > 120]
  assert not long, f"{page}: lines over 120 characters: {long}"
  if PAGES[page] is not None:
    assert len(lines) <= PAGES[page], f"{page} has {len(lines)} lines, more than {PAGES[page]}"
