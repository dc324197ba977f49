"""Loaders for the public scaling data sets of the law families, by path.

Each loader takes the file or folder described in that data set's PROVENANCE.md and returns float64 arrays;
`sources.folder(name)` gives the folder (packaged with cce_jax, or Epoch AI's downloaded on first use). A missing file
raises FileNotFoundError naming it; a file that is not UTF-8 CSV text or lacks the expected columns raises ValueError.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re

import numpy as np

LUO_PEAK_LR = 3e-4
LUO_FINAL_LR = 3e-5
LUO_WARMUP = 2160
LUO_MODELS = ("25", "100", "400")


def _read_csv(path, required):
  """Rows of a CSV as dicts, after checking the file exists and has the `required` columns."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such data file: {path!r} (cce_jax.scaling.sources lists the data sets)")
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      missing = [c for c in required if c not in (reader.fieldnames or ())]
      if missing:
        raise ValueError(f"{path!r} lacks the columns {missing}")
      rows = list(reader)
  except (UnicodeDecodeError, csv.Error) as e:
    raise ValueError(f"{path!r} is not a UTF-8 CSV text file ({e})") from None
  if not rows:
    raise ValueError(f"{path!r} has no rows")
  return rows


def _floats(rows, column):
  return np.array([float(r[column]) if r[column] != "" else math.nan for r in rows], np.float64)


def load_epoch_chinchilla(path, drop_highest: int = 5):
  """(x [N, 2] = (params N, tokens D), loss [N]) from Epoch AI's digitised Chinchilla points.

  D = C / (6 N). Besiroglu et al. drop the `drop_highest` highest losses (5: 245 -> 240 points).
  """
  rows = _read_csv(path, ("Model Size", "Training FLOP", "loss"))
  n, c, loss = (_floats(rows, k) for k in ("Model Size", "Training FLOP", "loss"))
  if drop_highest:
    keep = loss < np.sort(loss)[-drop_highest]
    n, c, loss = n[keep], c[keep], loss[keep]
  return np.stack([n, c / (6.0 * n)], axis=1), loss


def load_muennighoff(path):
  """(x [P, 3] = (N params, D tokens seen, U_D unique tokens), val loss [P]) from Muennighoff et al.'s runs.

  `path` is `fit_runs_182.csv` (the 182 runs of their R_D*, R_N* fit) or `all_listed_runs_296.csv`.
  """
  rows = _read_csv(path, ("params", "tokens", "unique_tokens", "val_loss"))
  x = np.stack([_floats(rows, c) for c in ("params", "tokens", "unique_tokens")], axis=1)
  return x, _floats(rows, "val_loss")


@dataclasses.dataclass(frozen=True)
class GadreRuns:
  """Gadre et al. (2024)'s models, one entry per model (P = 104).

  name, dataset (c4_original | rpj | rw_original), model (architecture): tuples of str [P]. n (params with
  embeddings), d (tokens), m (= D/N), flops (6ND): float64 [P]. loss: {valset: float64 [P]} for the 8 validation
  sets (`c4_val` is the paper's). error: average top-1 error over the 46 downstream tasks, 1 − mean accuracy,
  float64 [P] (NaN for a model without downstream results).
  """

  name: tuple
  dataset: tuple
  model: tuple
  n: np.ndarray
  d: np.ndarray
  m: np.ndarray
  flops: np.ndarray
  loss: dict
  error: np.ndarray

  def select(self, mask) -> "GadreRuns":
    """The runs where the boolean mask [P] is true."""
    mask = np.asarray(mask, bool)
    if mask.shape != (len(self.name),):
      raise ValueError(f"mask must have shape [{len(self.name)}], got {mask.shape}")
    pick = lambda seq: tuple(v for v, k in zip(seq, mask) if k)
    return GadreRuns(name=pick(self.name), dataset=pick(self.dataset), model=pick(self.model), n=self.n[mask],
                     d=self.d[mask], m=self.m[mask], flops=self.flops[mask],
                     loss={k: v[mask] for k, v in self.loss.items()}, error=self.error[mask])


def load_gadre(folder):
  """GadreRuns from `models_val_losses.csv` and `models_downstream_accuracy.csv` in `folder`."""
  rows = _read_csv(os.path.join(folder, "models_val_losses.csv"),
                   ("name", "dataset", "model", "params", "tokens", "token_multiplier_M", "flops_6ND", "loss_c4_val"))
  valsets = [c[len("loss_"):] for c in rows[0]
             if c.startswith("loss_") and not c.startswith(("loss_seq_", "loss_tok_"))]
  acc_rows = _read_csv(os.path.join(folder, "models_downstream_accuracy.csv"), ("name",))
  acc_columns = [c for c in acc_rows[0] if c.startswith("acc_")]
  if not acc_columns:
    raise ValueError(f"{folder!r}: models_downstream_accuracy.csv has no acc_* columns")
  by_name = {r["name"]: 1.0 - np.mean([float(r[c]) for c in acc_columns]) for r in acc_rows}
  names = tuple(r["name"] for r in rows)
  return GadreRuns(
      name=names, dataset=tuple(r["dataset"] for r in rows), model=tuple(r["model"] for r in rows),
      n=_floats(rows, "params"), d=_floats(rows, "tokens"), m=_floats(rows, "token_multiplier_M"),
      flops=_floats(rows, "flops_6ND"), loss={v: _floats(rows, "loss_" + v) for v in valsets},
      error=np.array([by_name.get(n, math.nan) for n in names], np.float64))


@dataclasses.dataclass(frozen=True)
class LossCurve:
  """One logged training curve: steps int64 [P], lr float64 [P] (the LR at that step), loss float64 [P]."""

  name: str
  steps: np.ndarray
  lr: np.ndarray
  loss: np.ndarray


def load_luo_curves(folder, model) -> dict:
  """{schedule name: LossCurve} for one model size (25, 100 or 400 million params) of Luo et al. (2025).

  `folder` is `luo2025_multipower_lr_schedules/` (holding csv_25/, csv_100/, csv_400/). Names are the file stems,
  e.g. "cosine_24000"; `luo_lr_schedule(name)` rebuilds the per-step LR.
  """
  model = str(model).removesuffix("M")
  if model not in LUO_MODELS:
    raise ValueError(f"model must be one of {LUO_MODELS} (millions of parameters), got {model!r}")
  sub = os.path.join(os.fspath(folder), f"csv_{model}")
  if not os.path.isdir(sub):
    raise FileNotFoundError(f"no such data folder: {sub!r}")
  curves = {}
  for file in sorted(f for f in os.listdir(sub) if f.endswith(".csv")):
    rows = _read_csv(os.path.join(sub, file), ("step", "lr", "loss"))
    name = file[:-len(".csv")]
    curves[name] = LossCurve(name=name, steps=_floats(rows, "step").astype(np.int64), lr=_floats(rows, "lr"),
                             loss=_floats(rows, "loss"))
  if not curves:
    raise FileNotFoundError(f"no CSV curves in {sub!r}")
  return curves


def luo_lr_schedule(name: str, *, peak: float = LUO_PEAK_LR, final: float = LUO_FINAL_LR,
                    warmup: int = LUO_WARMUP) -> np.ndarray:
  """η_s for s = 1..T (float64 [T]) of a Luo et al. schedule, from its name (their README's table).

  Linear warmup η_s = peak · s / warmup for s <= warmup, then
    constant_T: peak;  cosine_T: final + (peak − final)(1 + cos(π (s − warmup)/(T − warmup)))/2;
    wsd_S_T: peak to S, then geometric peak (final/peak)^((s − S)/(T − S));
    wsdld_S_T: peak to S, then linear peak + (final − peak)(s − S)/(T − S);
    wsdcon_k: peak for s < 8000, then k · 1e-5 until T = 16000.
  """
  patterns = {"constant": r"constant_(\d+)", "cosine": r"cosine_(\d+)", "wsd": r"wsd_(\d+)_(\d+)",
              "wsdld": r"wsdld_(\d+)_(\d+)", "wsdcon": r"wsdcon_(\d+)"}
  kind, match = next(((k, re.fullmatch(p, name)) for k, p in patterns.items() if re.fullmatch(p, name)), (None, None))
  if kind is None:
    raise ValueError(f"unknown schedule name {name!r}; expected one of constant_T, cosine_T, wsd_S_T, wsdld_S_T, "
                     "wsdcon_k")
  total = 16000 if kind == "wsdcon" else int(match.groups()[-1])
  if total <= warmup:
    raise ValueError(f"schedule {name!r} ends at {total}, not after the warmup ({warmup} steps)")
  s = np.arange(1, total + 1, dtype=np.float64)
  lr = np.full(total, peak)
  if kind == "cosine":
    lr = final + 0.5 * (peak - final) * (1.0 + np.cos(np.pi * (s - warmup) / (total - warmup)))
  elif kind in ("wsd", "wsdld"):
    start = int(match.group(1))
    frac = np.clip((s - start) / (total - start), 0.0, 1.0)
    lr = peak * (final / peak) ** frac if kind == "wsd" else peak + (final - peak) * frac
  elif kind == "wsdcon":
    lr = np.where(s < 8000, peak, int(match.group(1)) * 1e-5)
  return np.where(s <= warmup, peak * s / warmup, lr)
