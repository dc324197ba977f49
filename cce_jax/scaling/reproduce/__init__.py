"""Reproductions of published scaling-law results from public data, by name.

Each reproduction is a module with a docstring saying what it reproduces and
  run(data_root: str | None = None, **options) -> list[dict]
whose rows have keys `quantity` (str), `reproduced` (float), `published` (float or None) and optionally `note`.
The data come from `cce_jax.scaling.sources.folder(name, data_root)`: a sub-folder of `data_root` when it is there,
else the copy packaged with cce_jax, else (Epoch AI's points) the cached download. Missing data raise
`sources.DataUnavailable` (a FileNotFoundError) saying how to get them. Modules are imported lazily by name, so one
that is missing or broken only fails when it is asked for.
"""

from __future__ import annotations

import importlib
import inspect
import math
import types

REPRODUCTIONS = {
    "epoch_chinchilla": "cce_jax.scaling.reproduce.epoch_chinchilla",
    "porian": "cce_jax.scaling.reproduce.porian",
    "muennighoff": "cce_jax.scaling.reproduce.muennighoff",
    "gadre": "cce_jax.scaling.reproduce.gadre",
    "luo_schedules": "cce_jax.scaling.reproduce.luo_schedules",
}
"""Reproduction name -> module path."""

ROW_KEYS = ("quantity", "reproduced", "published")


def get(name: str) -> types.ModuleType:
  """The module of reproduction `name`; ValueError for an unknown name or a registered module not in this checkout."""
  if name not in REPRODUCTIONS:
    raise ValueError(f"unknown reproduction {name!r}; choose from {sorted(REPRODUCTIONS)}")
  path = REPRODUCTIONS[name]
  try:
    module = importlib.import_module(path)
  except ModuleNotFoundError as e:
    if e.name != path:
      raise  # the module exists but one of its own imports is missing
    raise ValueError(f"reproduction {name!r} is registered but its module {path} is not in this checkout") from e
  if not callable(getattr(module, "run", None)):
    raise ValueError(f"reproduction module {path} has no run(data_root) function")
  return module


def run(name: str, data_root: str | None = None, **options) -> list[dict]:
  """Runs reproduction `name` (on `data_root`, or the packaged / cached data) and checks its rows. `options` (e.g. grid_stride) are passed on only
  to a `run` that accepts them."""
  fn = get(name).run
  params = inspect.signature(fn).parameters
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  rows = fn(data_root, **{k: v for k, v in options.items() if takes_any or k in params})
  return check_rows(name, rows)


def check_rows(name: str, rows) -> list[dict]:
  """Rows as a list of dicts with float `reproduced` and float-or-None `published`; ValueError otherwise."""
  if not isinstance(rows, list) or not rows:
    raise ValueError(f"reproduction {name!r} must return a non-empty list of rows, got {type(rows).__name__}")
  out = []
  for i, row in enumerate(rows):
    missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
    if missing:
      raise ValueError(f"reproduction {name!r} row {i} lacks {missing}")
    out.append(dict(row, reproduced=float(row["reproduced"]),
                    published=None if row["published"] is None else float(row["published"])))
  return out


def relative_difference(row: dict) -> float | None:
  """(reproduced − published) / |published|, or None without a (non-zero) published value."""
  if row["published"] is None or row["published"] == 0:
    return None
  return (row["reproduced"] - row["published"]) / abs(row["published"])


def _number(v) -> str:
  if v is None:
    return "—"
  if math.isnan(v):
    return "nan"
  return f"{v:.5g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.4e}"


def markdown_table(results: dict) -> str:
  """A markdown table of {reproduction name: rows}: reproduced next to published, with the relative difference."""
  lines = ["| reproduction | quantity | reproduced | published | rel. diff | note |", "|---|---|---:|---:|---:|---|"]
  for name, rows in results.items():
    for row in rows:
      rel = relative_difference(row)
      note, quantity = (str(row.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in ("note", "quantity"))
      lines.append(f"| {name} | {quantity} | {_number(row['reproduced'])} | {_number(row['published'])} | "
                   f"{'—' if rel is None else f'{100 * rel:+.2f}%'} | {note} |")
  return "\n".join(lines) + "\n"
