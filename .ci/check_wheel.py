"""Checks an installed (non-editable) cce_jax: every subpackage and module imports, and the data files shipped.

Run it with the interpreter of a venv where the wheel is installed, from a folder outside the repository, isolated
so that neither the current folder nor this script's folder is on sys.path:

  cd /tmp && /path/to/.venv-wheel/bin/python -I /path/to/repo/.ci/check_wheel.py

Exits 1 with a line per problem; prints what it checked otherwise.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pathlib
import pkgutil
import sys
import traceback

REQUIRED = ("cce_jax", "cce_jax.ops", "cce_jax.ops.linear_cross_entropy", "cce_jax.training", "cce_jax.data",
            "cce_jax.scaling", "cce_jax.scaling.laws", "cce_jax.scaling.reproduce", "cce_jax.models", "cce_jax.quant")
"""Packages that must be present (walk_packages cannot see a folder that lacks its __init__.py)."""

DATA_FILES = {
    "gadre2024_overtraining": ("models_val_losses.csv", "models_downstream_accuracy.csv", "eval_metadata.csv"),
    "luo2025_multipower_lr_schedules": tuple(f"csv_{m}/cosine_24000.csv" for m in (25, 100, 400)),
    "muennighoff2023_datablations": ("fit_runs_182.csv", "all_listed_runs_296.csv"),
    "porian2024_resolving_discrepancies": ("isoflop_points.csv", "compute_optimal_points.csv",
                                           "published_fit_results.csv"),
}
"""Packaged data sets and files each must hold (besides LICENSE and PROVENANCE.md)."""


def check_installed(problems: list) -> None:
  import cce_jax  # pylint: disable=import-outside-toplevel

  location = pathlib.Path(cce_jax.__file__).resolve()
  if "site-packages" not in location.parts:
    problems.append(f"cce_jax was imported from {location}, not from an installed wheel (run from outside the "
                    "repository, with python -I)")
  installed = importlib.metadata.version("cce_jax")
  if installed != cce_jax.__version__:
    problems.append(f"installed metadata version {installed} != cce_jax.__version__ {cce_jax.__version__}")
  print(f"cce_jax {cce_jax.__version__} from {location.parent}")


def check_imports(problems: list) -> list[str]:
  """Imports REQUIRED and every module pkgutil.walk_packages finds under cce_jax; returns the names imported."""
  import cce_jax  # pylint: disable=import-outside-toplevel

  def on_error(name):
    problems.append(f"cannot import package {name}: {sys.exc_info()[1]!r}")

  names = sorted({*REQUIRED, *(m.name for m in pkgutil.walk_packages(cce_jax.__path__, "cce_jax.", onerror=on_error))})
  for name in names:
    try:
      importlib.import_module(name)
    except Exception:  # pylint: disable=broad-except
      problems.append(f"cannot import {name}:\n{traceback.format_exc()}")
  return names


def check_data(problems: list) -> None:
  from cce_jax.scaling import sources  # pylint: disable=import-outside-toplevel
  from cce_jax.scaling import datasets  # pylint: disable=import-outside-toplevel

  if tuple(sorted(DATA_FILES)) != tuple(sorted(sources.PACKAGED)):
    problems.append(f"this check knows {sorted(DATA_FILES)}, the package ships {sorted(sources.PACKAGED)}")
  for name, files in DATA_FILES.items():
    folder = sources.folder(name)
    for file in ("LICENSE", "PROVENANCE.md", *files):
      if not (folder / file).is_file():
        problems.append(f"the installed package lacks {folder / file}")
  try:  # the loaders read the installed copies
    assert datasets.load_muennighoff(sources.folder("muennighoff2023_datablations") / "fit_runs_182.csv")[0].shape \
        == (182, 3)
    assert len(datasets.load_gadre(sources.folder("gadre2024_overtraining")).name) == 104
    assert len(datasets.load_luo_curves(sources.folder("luo2025_multipower_lr_schedules"), 25)) == 9
  except Exception:  # pylint: disable=broad-except
    problems.append(f"reading the packaged data failed:\n{traceback.format_exc()}")


def main() -> int:
  problems = []
  check_installed(problems)
  names = check_imports(problems)
  check_data(problems)
  if problems:
    print(f"wheel check: {len(problems)} problem(s)", file=sys.stderr)
    for p in problems:
      print(f"  {p}", file=sys.stderr)
    return 1
  print(f"wheel check: imported {len(names)} modules from {os.getcwd()}; packaged data present "
        f"({', '.join(sorted(DATA_FILES))})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
