"""Loading the public scaling data sets (read by path; nothing is bundled)."""

from __future__ import annotations

import csv

import numpy as np


def load_epoch_chinchilla(path: str, drop_highest: int = 5):
  """(x [N, 2] = (params N, tokens D), loss [N]) from Epoch AI's digitised Chinchilla points.

  D = C / (6 N). Besiroglu et al. drop the `drop_highest` highest losses (5: 245 -> 240 points).
  """
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  n = np.array([float(r["Model Size"]) for r in rows])
  c = np.array([float(r["Training FLOP"]) for r in rows])
  loss = np.array([float(r["loss"]) for r in rows])
  if drop_highest:
    keep = loss < np.sort(loss)[-drop_highest]
    n, c, loss = n[keep], c[keep], loss[keep]
  return np.stack([n, c / (6.0 * n)], axis=1), loss
