r"""Fits a scaling law to a CSV of runs, or runs the registered reproductions of published results.

  python experiments/fit_scaling.py --law=chinchilla --data=runs.csv --out=/tmp/fit [--bootstrap=200] \
      [--grid_stride=10]
  python experiments/fit_scaling.py --law=chinchilla --format=epoch --out=/tmp/epoch \
      --data=$HOME/.cache/cce_jax/scaling/epoch_chinchilla_replication/svg_extracted_data.csv
  python experiments/fit_scaling.py --reproduce=all --out=/tmp/repro [--data_root=DIR] [--grid_stride=10]

Input (--format=csv): a header row with one column per covariate of the law, named as in the law (chinchilla:
`N`, `D`), a `loss` column and optionally `weight` (per-run weights of the objective); other columns are ignored.
--format=epoch reads Epoch AI's svg_extracted_data.csv (`Model Size`, `Training FLOP`, `loss`; D = C / (6N); the 5
highest losses dropped, as Besiroglu et al. do) for laws of (N, D); `--reproduce=epoch_chinchilla` downloads it
to the path above (cce_jax.scaling.sources).

Fit mode prints a parameter table and writes DIR/fit.json (law, points, `params` under the papers' names,
`theta` in fit space, the objective and convergence counts; with --bootstrap=K the bootstrap's percentile intervals
and standard errors; for Chinchilla laws the allocation exponents a = β/(α+β), b = α/(α+β)) and plots: DIR/fit.png
(data and fitted law) and, for laws of (N, D), DIR/frontier.png (N_opt(C), with a band from the bootstrap draws) and
DIR/isoflop.png when the runs form IsoFLOP profiles (>= 3 runs at each of >= 2 compute budgets).

--reproduce=NAME[,NAME...] or `all` runs the registered reproductions (cce_jax.scaling.reproduce), printing a line
as each finishes, then a markdown table of reproduced against published numbers, also written to
DIR/reproductions.md and DIR/reproductions.json. The data ship with cce_jax, except Epoch AI's Chinchilla points,
which are downloaded on first use from a pinned URL and cached under ~/.cache/cce_jax/ ($CCE_JAX_CACHE or
$XDG_CACHE_HOME move it). --data_root=DIR (one sub-folder per data set, as in cce_jax/scaling/data/) is used first
where it has a data set: offline use, or your own copies. A reproduction that fails (its data missing, say) is
reported, the others still run, and the exit status is 1.
--grid_stride=k uses every k-th start of the law's multi-start grid (faster, for smoke runs).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from cce_jax.scaling import allocation
from cce_jax.scaling import datasets
from cce_jax.scaling import fitting
from cce_jax.scaling import isoflop
from cce_jax.scaling import laws as laws_lib
from cce_jax.scaling import plots
from cce_jax.scaling import reproduce

_LAW = flags.DEFINE_string("law", None, "Law name (cce_jax.scaling.LAWS), e.g. chinchilla.")
_DATA = flags.DEFINE_string("data", None, "CSV of runs (see the module docstring for the columns).")
_FORMAT = flags.DEFINE_enum("format", "csv", ["csv", "epoch"], "Input format.")
_OUT = flags.DEFINE_string("out", None, "Output directory (created).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 0, "Bootstrap resamples for intervals (0: none).")
_LEVEL = flags.DEFINE_float("level", 0.95, "Coverage of the bootstrap percentile intervals.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.")
_GRID_STRIDE = flags.DEFINE_integer("grid_stride", 1, "Use every k-th start of the law's grid.")
_REDUCTION = flags.DEFINE_enum("reduction", "sum", ["sum", "mean"], "Reduction of the Huber objective.")
_DELTA = flags.DEFINE_float("delta", 1e-3, "Huber threshold on log-loss residuals.")
_ISOFLOP_TOL = flags.DEFINE_float("isoflop_log10_tolerance", 1e-6,
                                  "Runs whose log10 C differ by at most this share an IsoFLOP budget.")
_ISOFLOP_WINDOW = flags.DEFINE_integer("isoflop_window", 0,
                                       "Points on each side of a budget's lowest loss in its parabola (0: all).")
_REPRODUCE = flags.DEFINE_string("reproduce", None, "Reproduction name(s), comma-separated, or 'all'.")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Folder with one sub-folder per scaling data set, used before the "
                                  "packaged and cached copies where it has one (offline use).")


# ----------------------------------------------------------------------------------------------------- input


def read_runs(path: str, law: laws_lib.Law, fmt: str = "csv"):
  """(x [runs, K] in the law's covariate order, loss [runs], weights [runs] or None) from `path`."""
  if not os.path.isfile(path):
    raise app.UsageError(f"--data: no such file {path!r}")
  if fmt == "epoch":
    if law.covariates != ("N", "D"):
      raise app.UsageError(f"--format=epoch gives (N, D); law {law.name!r} needs {law.covariates}")
    try:
      x, loss = datasets.load_epoch_chinchilla(path)
    except ValueError as e:
      raise app.UsageError(f"--data: {e}") from None
    return x, loss, None
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      columns = list(reader.fieldnames or ())
      missing = [c for c in (*law.covariates, "loss") if c not in columns]
      if missing:
        raise app.UsageError(f"{path!r} lacks the columns {missing} (law {law.name!r} needs "
                             f"{[*law.covariates, 'loss']} and optionally 'weight'; found {columns})")
      rows = list(reader)
  except (UnicodeDecodeError, csv.Error) as e:
    raise app.UsageError(f"--data: {path!r} is not a UTF-8 CSV text file ({e})") from None
  if not rows:
    raise app.UsageError(f"{path!r} has no rows")

  def column(name):
    try:
      return np.array([float(r[name]) for r in rows])
    except (TypeError, ValueError) as e:
      raise app.UsageError(f"{path!r}: column {name!r} has a value that is not a number ({e})") from e

  x = np.stack([column(c) for c in law.covariates], axis=1)
  return x, column("loss"), column("weight") if "weight" in columns else None


# ------------------------------------------------------------------------------------------------- bootstrap


def bootstrap_draws(law, x, loss, weights, *, resamples: int, seed: int, fit_kwargs: dict) -> np.ndarray:
  """Fit-space parameter draws [K, P] from pairs-bootstrap refits by `cce_jax.scaling.bootstrap`.

  The one place that knows that module's API: it calls `pairs_bootstrap` (or `pairs`) with
  (law, x, loss, weights=, n_resamples=, seed=, **fit_kwargs) and accepts an array [K, P], an object with `thetas` or
  `theta`, or a list of fit results with `.theta`.
  """
  name = "cce_jax.scaling.bootstrap"
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name != name:
      raise
    raise app.UsageError(f"--bootstrap needs {name}, which is not in this checkout") from e
  fn = getattr(module, "pairs_bootstrap", None) or getattr(module, "pairs", None)
  if not callable(fn):
    public = sorted(n for n in dir(module) if not n.startswith("_"))
    raise app.UsageError(f"{name} has no pairs bootstrap (pairs_bootstrap or pairs); it has {public}")
  try:
    out = fn(law, x, loss, weights=weights, n_resamples=resamples, seed=seed, **fit_kwargs)
  except TypeError as e:
    raise app.UsageError(f"{name}.{fn.__name__} does not take the arguments this script passes ({e}); "
                         f"update bootstrap_draws in {__file__}") from e
  if isinstance(out, (list, tuple)) and out and hasattr(out[0], "theta"):
    draws = np.stack([np.asarray(r.theta) for r in out])
  else:
    draws = getattr(out, "thetas", getattr(out, "theta", out))
  draws = np.asarray(draws, np.float64)
  if draws.ndim != 2 or draws.shape[1] != len(law.params):
    raise app.UsageError(f"{name}.{fn.__name__} returned draws of shape {draws.shape}; expected "
                         f"[{resamples}, {len(law.params)}]")
  return draws


def intervals(law, draws, level: float) -> dict:
  """{paper name: {"lo", "hi", "se"}}: percentile intervals of `level` and standard deviations over the draws."""
  finite = draws[np.isfinite(draws).all(axis=1)]
  published = [law.published(t) for t in finite]
  out = {}
  for name in published[0]:
    v = np.array([p[name] for p in published])
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    out[name] = {"lo": float(lo), "hi": float(hi), "se": float(np.std(v, ddof=1))}
  return out


# ---------------------------------------------------------------------------------------------------- fit mode


def _n_opt(law, theta, compute):
  if law.name in ("chinchilla", "chinchilla_tied"):
    return allocation.chinchilla_optimum(law.published(theta), compute)[0]
  return allocation.numeric_optimum(law, theta, compute)[0]


def _isoflop(x, loss, weights, tolerance, window):
  """isoflop_fit over the budgets with >= 3 runs, or (None, reason)."""
  compute = isoflop.compute_of(x)
  labels, _ = isoflop.group_budgets(compute, log10_tolerance=tolerance)
  counts = np.bincount(labels)
  keep = counts[labels] >= 3
  if (counts >= 3).sum() < 2:
    return None, "the runs do not form IsoFLOP profiles (>= 3 runs at each of >= 2 compute budgets)"
  try:
    return isoflop.isoflop_fit(x[keep, 0], compute[keep], loss[keep],
                               weights=None if weights is None else weights[keep], window=window or None,
                               require_interior=True, skip_invalid=True, log10_tolerance=tolerance), None
  except ValueError as e:
    return None, str(e)


def write_plots(law, theta, x, loss, out: str, *, iso=None, draws=None, level: float = 0.95) -> list[str]:
  """DIR/fit.png; for laws of (N, D) also DIR/isoflop.png (given an IsoFLOP result) and DIR/frontier.png (N_opt(C)
  from the data's smallest budget to 1,000 times its largest, with a band from bootstrap draws [K, P]).
  Returns the paths written: none without matplotlib (an optional extra)."""
  if importlib.util.find_spec("matplotlib") is None:
    print("no plots: matplotlib is not installed (pip install 'cce_jax[plots]')")
    return []
  nd = {"N", "D"} <= set(law.covariates)
  paths = [plots.plot_law_fit(law, theta, x, loss, os.path.join(out, "fit.png"),
                              against="compute" if nd else law.covariates[0], color_by="N" if nd else None)]
  if law.covariates != ("N", "D"):
    return paths
  if iso is not None:
    paths.append(plots.plot_isoflop(iso, os.path.join(out, "isoflop.png")))
  c = isoflop.compute_of(x)
  grid = np.geomspace(c.min(), c.max() * 1e3, 60)
  try:
    band = None if draws is None else np.stack([_n_opt(law, t, grid) for t in draws])
    paths.append(plots.plot_frontier(grid, _n_opt(law, theta, grid), os.path.join(out, "frontier.png"), draws=band,
                                     level=level, minima=None if iso is None else (iso.compute, iso.n_opt)))
  except ValueError as e:
    print(f"no frontier plot: {e}")
  return paths


def fit_command(*, law_name: str, data: str, out: str, fmt: str = "csv", resamples: int = 0, level: float = 0.95,
                seed: int = 0, grid_stride: int = 1, reduction: str = "sum", delta: float = 1e-3,
                isoflop_tolerance: float = 1e-6, isoflop_window: int = 0) -> dict:
  """Fits, prints the table, writes DIR/fit.json and the plots; returns the JSON report."""
  try:
    law = laws_lib.get_law(law_name)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if grid_stride < 1:
    raise app.UsageError(f"--grid_stride must be >= 1, got {grid_stride}")
  if resamples < 0 or resamples == 1 or not 0 < level < 1:
    raise app.UsageError(f"--bootstrap must be 0 or >= 2 (got {resamples}) and --level in (0, 1) (got {level})")
  x, loss, weights = read_runs(data, law, fmt)
  os.makedirs(out, exist_ok=True)
  fit_kwargs = dict(init=law.init_grid()[::grid_stride], reduction=reduction, delta=delta)
  start = time.time()
  try:
    result = fitting.fit(law, x, loss, weights=weights, **fit_kwargs)
  except ValueError as e:
    raise app.UsageError(f"cannot fit {law.name!r} to {data!r}: {e}") from e
  report = {"law": law.name, "data": os.path.abspath(data), "format": fmt, "points": int(len(loss)),
            "params": result.params, "theta": dict(zip(law.params, map(float, result.theta))),
            "objective": result.objective, "reduction": reduction, "delta": delta, "converged": result.converged,
            "starts": result.starts, "converged_starts": result.converged_starts, "grid_stride": grid_stride,
            "fit_seconds": round(time.time() - start, 2)}
  if {"alpha", "beta"} <= set(result.params) and law.covariates == ("N", "D"):
    al, be = result.params["alpha"], result.params["beta"]
    report["allocation_exponents"] = {"a": be / (al + be), "b": al / (al + be)}

  draws = None
  if resamples:
    draws = bootstrap_draws(law, x, loss, weights, resamples=resamples, seed=seed, fit_kwargs=fit_kwargs)
    report["bootstrap"] = {"resamples": int(len(draws)), "level": level, "seed": seed,
                           "intervals": intervals(law, draws, level)}

  iso = None
  if law.covariates == ("N", "D"):
    iso, reason = _isoflop(x, loss, weights, isoflop_tolerance, isoflop_window)
    if iso is not None:
      report["isoflop"] = {"a": iso.a, "a_se": iso.n_law.exponent_se, "b": iso.b, "b_se": iso.d_law.exponent_se,
                           "budgets": len(iso.budgets), "skipped": list(iso.skipped)}
    else:
      print(f"no IsoFLOP analysis: {reason}")
  plot_paths = write_plots(law, result.theta, x, loss, out, iso=iso, draws=draws, level=level)
  report["plots"] = plot_paths
  with open(os.path.join(out, "fit.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print(parameter_table(report))
  return report


def parameter_table(report: dict) -> str:
  ci = report.get("bootstrap", {}).get("intervals")
  head = (f"law {report['law']}: {report['points']} points, objective {report['objective']:.6g} "
          f"({report['reduction']}), {report['starts']} starts ({report['converged_starts']} converged)\n")
  level = f"{100 * report['bootstrap']['level']:.0f}% interval" if ci else None
  lines = ["| parameter | value |" + (f" {level} | bootstrap SE |" if ci else ""),
           "|---|---:|" + ("---|---:|" if ci else "")]
  for name, value in report["params"].items():
    row = f"| {name} | {value:.6g} |"
    if ci:
      row += f" {ci[name]['lo']:.4g} – {ci[name]['hi']:.4g} | {ci[name]['se']:.3g} |"
    lines.append(row)
  return head + "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reproduce mode


def reproduce_command(*, names: str, data_root: str | None, out: str, grid_stride: int = 1) -> dict:
  """Runs the named reproductions ('all' or comma-separated), printing a line as each finishes; prints and writes
  the markdown table and JSON. A reproduction that raises ValueError or OSError (e.g. missing data) is reported as
  {"error": message} in the returned report and the others still run."""
  chosen = list(reproduce.REPRODUCTIONS) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in reproduce.REPRODUCTIONS]
  if unknown or not chosen:
    raise app.UsageError(f"unknown reproduction(s) {unknown}; choose from {sorted(reproduce.REPRODUCTIONS)} or all")
  os.makedirs(out, exist_ok=True)
  results, report = {}, {}
  for i, name in enumerate(chosen, 1):
    start = time.time()
    try:
      rows = reproduce.run(name, data_root, grid_stride=grid_stride)
    except (ValueError, OSError) as e:
      report[name] = {"error": str(e)}
      print(f"[{i}/{len(chosen)}] {name}: FAILED ({type(e).__name__}; the message is printed at the end)",
            flush=True)
      continue
    results[name] = rows
    report[name] = {"seconds": round(time.time() - start, 2), "rows": rows}
    print(f"[{i}/{len(chosen)}] {name}: {len(rows)} rows in {report[name]['seconds']:.1f} s", flush=True)
  table = reproduce.markdown_table(results)
  print(table)
  with open(os.path.join(out, "reproductions.md"), "w", encoding="utf-8") as f:
    f.write(table)
  with open(os.path.join(out, "reproductions.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return report


def run_main(argv) -> int:
  """The command behind main; raises app.UsageError for bad flags or input. Returns the exit status."""
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _OUT.value:
    raise app.UsageError("--out is required")
  if _REPRODUCE.value:
    report = reproduce_command(names=_REPRODUCE.value, data_root=_DATA_ROOT.value, out=_OUT.value,
                               grid_stride=_GRID_STRIDE.value)
    failed = {name: r["error"] for name, r in report.items() if "error" in r}
    for name, error in failed.items():
      print(f"error: reproduction {name!r} failed: {error}", file=sys.stderr)
    return 1 if failed else 0
  if not (_LAW.value and _DATA.value):
    raise app.UsageError("give --law and --data (fit mode) or --reproduce (reproduction mode)")
  fit_command(law_name=_LAW.value, data=_DATA.value, out=_OUT.value, fmt=_FORMAT.value, resamples=_BOOTSTRAP.value,
              level=_LEVEL.value, seed=_SEED.value, grid_stride=_GRID_STRIDE.value, reduction=_REDUCTION.value,
              delta=_DELTA.value, isoflop_tolerance=_ISOFLOP_TOL.value, isoflop_window=_ISOFLOP_WINDOW.value)
  return 0


def main(argv):
  # absl prints the whole --help before a UsageError's message; print the message alone.
  try:
    status = run_main(argv)
  except app.UsageError as e:
    print(f"{os.path.basename(argv[0])}: {e} (see --help)", file=sys.stderr)
    status = e.exitcode
  sys.exit(status)


if __name__ == "__main__":
  app.run(main)
