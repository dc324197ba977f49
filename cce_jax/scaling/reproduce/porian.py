"""Porian et al. (2024), "Resolving Discrepancies in Compute-Optimal Scaling of Language Models": IsoFLOP exponents.

Data: `porian2024_resolving_discrepancies/` (packaged; `sources.folder`): isoflop_points.csv,
compute_optimal_points.csv, published_fit_results.csv, converted from the authors' summaries.

Along RefinedWeb's path from Kaplan-like to Chinchilla-like settings, (base hparams, long warmup, Kaplan decay,
Kaplan params, train loss) → standard params (val) → short warmup → matched cosine decay → tuned hparams with a
constant LR, the exponent a of N* ∝ C^a falls from ≈ 0.83 to ≈ 0.50.

For each configuration:
* a and b (D* ∝ C^b) from the raw IsoFLOP samples with `isoflop.isoflop_fit`: a parabola in ln N through the 5 points
  around each budget's lowest loss (window 2), budgets whose lowest loss is at an end of the sampled N left out, then
  least squares in log-log space. Published: the authors' `basic` fit. They locate each minimum with an Akima
  interpolant of ln L against ln N (the median over a seed-noise bootstrap), not a parabola, so the two differ where
  the IsoFLOP curves are asymmetric (most in the Kaplan-like setting).
* a from the authors' own compute-optimal points with `isoflop.fit_power_law`, unweighted (published: `basic`) and
  weighted by 1 / std(ln N*)² (published: `weighted`): a check of the power-law step alone.
"""

from __future__ import annotations

import collections
import csv

import numpy as np

from cce_jax.scaling import isoflop
from cce_jax.scaling import sources

FOLDER = "porian2024_resolving_discrepancies"
KEYS = ("source_file", "dataset", "hparams", "warmup", "decay", "param_count", "loss_split")

PATH_CONFIGS = (
    ("summary_df.pickle.xz", "rw", "base", "long", "kaplan", "kaplan", "train"),
    ("summary_df.pickle.xz", "rw", "base", "long", "kaplan", "standard", "val"),
    ("summary_df.pickle.xz", "rw", "base", "short", "kaplan", "standard", "val"),
    ("summary_df.pickle.xz", "rw", "base", "short", "chinchilla", "standard", "val"),
    ("summary_df.pickle.xz", "rw", "tuned", "short", "const", "standard", "val"),
)
"""RefinedWeb's path from Kaplan-like to Chinchilla-like settings (the headline rows of the data's PROVENANCE.md)."""

WINDOW = 2


def _read(data_root, name):
  path = sources.folder(FOLDER, data_root) / name
  if not path.is_file():
    raise FileNotFoundError(f"Porian et al.'s data is not at {path}")
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _by_config(rows):
  out = collections.defaultdict(list)
  for r in rows:
    out[tuple(r[k] for k in KEYS)].append(r)
  return out


def _label(config):
  return "/".join(config[1:])


def _float(v):
  return float(v) if v not in ("", None) else float("nan")


def run(data_root: str | None = None, *, configs: str = "path") -> list[dict]:
  """Rows for each configuration: `configs` = "path" (the five RefinedWeb rows) or "all" (every configuration)."""
  if configs not in ("path", "all"):
    raise ValueError(f"configs must be 'path' or 'all', got {configs!r}")
  points = _by_config(_read(data_root, "isoflop_points.csv"))
  optimal = _by_config(_read(data_root, "compute_optimal_points.csv"))
  published = {tuple(r[k] for k in KEYS) + (r["fit"],): r for r in _read(data_root, "published_fit_results.csv")}
  chosen = PATH_CONFIGS if configs == "path" else tuple(points)
  rows = []
  for config in chosen:
    if config not in points:
      raise ValueError(f"configuration {_label(config)} is not in isoflop_points.csv")
    label = _label(config)
    basic, weighted = published[config + ("basic",)], published[config + ("weighted",)]
    ci = published.get(config + ("bootstrap_CI95",))
    headline = published.get(config + ("bs_median_weighted",))

    p = points[config]
    result = isoflop.isoflop_fit([float(r["n_params"]) for r in p], [float(r["flops"]) for r in p],
                                 [float(r["loss"]) for r in p], window=WINDOW, require_interior=True)
    note = (f"{len(result.budgets)} budgets ({len(result.skipped)} unbracketed left out), parabola window "
            f"{WINDOW}, regression SE {result.n_law.exponent_se:.3f}")
    if ci is not None:
      note += f"; published 95% bootstrap CI {_float(ci['n_exponent_lo']):.3f}–{_float(ci['n_exponent_hi']):.3f}"
    if headline is not None:
      note += f", bs_median_weighted {_float(headline['n_exponent']):.3f}"
    rows.append({"quantity": f"{label}: a (N* ∝ C^a), IsoFLOP parabolas", "reproduced": result.a,
                 "published": _float(basic["n_exponent"]), "note": note})
    rows.append({"quantity": f"{label}: b (D* ∝ C^b), IsoFLOP parabolas", "reproduced": result.b,
                 "published": _float(basic["t_exponent"]), "note": "D* = C / (6 N*)"})

    opt = [r for r in optimal[config] if r["n_opt"] and r["n_star_std_log"]]
    c = np.array([float(r["flops"]) for r in opt])
    n_opt = np.array([float(r["n_opt"]) for r in opt])
    sigma = np.array([float(r["n_star_std_log"]) for r in opt])
    rows.append({"quantity": f"{label}: a from the published N* (unweighted)",
                 "reproduced": isoflop.fit_power_law(c, n_opt).exponent, "published": _float(basic["n_exponent"]),
                 "note": f"{len(opt)} budgets from compute_optimal_points.csv"})
    rows.append({"quantity": f"{label}: a from the published N* (weights 1/std(ln N*)²)",
                 "reproduced": isoflop.fit_power_law(c, n_opt, weights=sigma ** -2.0).exponent,
                 "published": _float(weighted["n_exponent"]), "note": ""})
  return rows
