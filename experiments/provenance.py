"""The code a script's results come from, for its output header and JSON (imported by experiments/*.py)."""

from __future__ import annotations

import os
import subprocess


def commit() -> str:
  """`git describe --always --dirty` of this tree ($CCE_COMMIT for copies without .git), or "unknown"."""
  if os.environ.get("CCE_COMMIT"):
    return os.environ["CCE_COMMIT"]
  try:
    # --dirty: a tree that differs from HEAD (uncommitted edits, a copy next to an older .git) says so
    return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
