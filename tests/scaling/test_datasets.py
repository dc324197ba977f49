"""Loaders of the public scaling data sets: shapes and values on the packaged files, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from cce_jax.scaling import datasets
from cce_jax.scaling import sources

MUENNIGHOFF = sources.folder("muennighoff2023_datablations")
GADRE = sources.folder("gadre2024_overtraining")
LUO = sources.folder("luo2025_multipower_lr_schedules")


def test_load_muennighoff():
  x, loss = datasets.load_muennighoff(MUENNIGHOFF / "fit_runs_182.csv")
  assert x.shape == (182, 3) and loss.shape == (182,)
  assert x.dtype == np.float64 and (x > 0).all() and ((loss > 1.5) & (loss < 10)).all()
  np.testing.assert_array_equal(x[0], [2.81e9, 32e9, 4e9])  # the first run, 2b832b4b
  assert loss[0] == 2.722962
  assert (x[:, 1] >= x[:, 2]).all()  # tokens seen >= unique tokens
  x_all, _ = datasets.load_muennighoff(MUENNIGHOFF / "all_listed_runs_296.csv")
  assert x_all.shape == (296, 3)


def test_load_gadre():
  runs = datasets.load_gadre(GADRE)
  assert len(runs.name) == 104 and runs.n.shape == (104,)
  assert set(runs.dataset) == {"c4_original", "rpj", "rw_original"}
  assert len(runs.loss) == 8 and runs.loss["c4_val"].shape == (104,)
  np.testing.assert_allclose(runs.m, runs.d / runs.n, rtol=1e-3)
  np.testing.assert_allclose(runs.flops, 6 * runs.n * runs.d, rtol=1e-9)
  assert ((runs.error > 0) & (runs.error < 1)).all()
  rpj = runs.select(np.array([d == "rpj" for d in runs.dataset]))
  assert len(rpj.name) == 35 and rpj.loss["c4_val"].shape == (35,)
  with pytest.raises(ValueError, match="mask"):
    runs.select(np.ones(3, bool))


def test_load_luo_curves_and_rebuilt_schedules():
  curves = datasets.load_luo_curves(LUO, "100M")
  assert len(curves) == 9 and "wsdcon_9" in curves
  for name, curve in curves.items():
    assert curve.steps.dtype == np.int64 and curve.steps.shape == curve.lr.shape == curve.loss.shape
    lr = datasets.luo_lr_schedule(name)
    assert curve.steps.max() <= len(lr)
    np.testing.assert_allclose(lr[curve.steps - 1], curve.lr, rtol=0, atol=1e-12, err_msg=name)


def test_luo_lr_schedule_shapes():
  cosine = datasets.luo_lr_schedule("cosine_24000")
  assert cosine.shape == (24000,)
  np.testing.assert_allclose(cosine[[0, 2159, 23999]], [3e-4 / 2160, 3e-4, 3e-5], rtol=1e-12)
  step = datasets.luo_lr_schedule("wsdcon_18")
  assert step.shape == (16000,) and step[7998] == 3e-4 and step[7999] == pytest.approx(18e-5)
  with pytest.raises(ValueError, match="unknown schedule"):
    datasets.luo_lr_schedule("linear_100")
  with pytest.raises(ValueError, match="warmup"):
    datasets.luo_lr_schedule("constant_2000")


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such data file"):
    datasets.load_muennighoff(tmp_path / "fit_runs_182.csv")
  with pytest.raises(FileNotFoundError, match="models_val_losses.csv"):
    datasets.load_gadre(tmp_path)
  with pytest.raises(FileNotFoundError, match="csv_25"):
    datasets.load_luo_curves(tmp_path, 25)
  (tmp_path / "csv_25").mkdir()
  with pytest.raises(FileNotFoundError, match="no CSV"):
    datasets.load_luo_curves(tmp_path, 25)


def test_bad_files(tmp_path):
  bad = tmp_path / "runs.csv"
  bad.write_text("params,tokens,val_loss\n1,2,3\n", encoding="utf-8")
  with pytest.raises(ValueError, match="unique_tokens"):
    datasets.load_muennighoff(bad)
  empty = tmp_path / "empty.csv"
  empty.write_text("params,tokens,unique_tokens,val_loss\n", encoding="utf-8")
  with pytest.raises(ValueError, match="no rows"):
    datasets.load_muennighoff(empty)
  with pytest.raises(ValueError, match="model must be one of"):
    datasets.load_luo_curves(tmp_path, 50)
