"""launch/ is a folder of scripts, not a package: its modules import each other by name, as when launch.py runs."""

import pathlib
import sys

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch"
if str(LAUNCH) not in sys.path:
  sys.path.insert(0, str(LAUNCH))
