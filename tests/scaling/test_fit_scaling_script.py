"""experiments/fit_scaling.py: fit mode on a small synthetic CSV (as a process, and in-process with the real
bootstrap at a small size), bad input and short usage errors, and the reproductions (registry, progress lines,
missing data, Epoch AI's Chinchilla fit from the download cache, Porian et al.'s exponents)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

from cce_jax import scaling
from cce_jax.scaling import allocation
from cce_jax.scaling import reproduce
from cce_jax.scaling import sources

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "fit_scaling.py"

TRUTH = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
STRIDE = "100"  # 45 of the 4,500 grid starts


def _env(**overrides):
  return dict(os.environ, JAX_PLATFORMS="cpu", **overrides)


def _write_runs(path, weight=True, noise=0.0):
  """3 IsoFLOP budgets × 5 model sizes centred on N_opt, Chinchilla losses: noise-free, or each multiplied by
  exp(noise · z) with z ~ N(0, 1) from a fixed seed (the same z for every noise level)."""
  budgets = np.array([1e19, 1e20, 1e21])
  n_opt, _ = allocation.chinchilla_optimum(TRUTH, budgets)
  z = iter(np.random.default_rng(0).standard_normal(15))
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["N", "D", "loss", "note"] + (["weight"] if weight else []))
    for c, center in zip(budgets, n_opt):
      for n in center * np.geomspace(0.25, 4, 5):
        d = c / (6 * n)
        loss = TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]
        w.writerow([n, d, loss * np.exp(noise * next(z)), "x"] + ([1.0] if weight else []))
  return path


def _run(*args, **env):
  return subprocess.run([sys.executable, str(SCRIPT), *args], env=_env(**env), capture_output=True, text=True,
                        timeout=600)


def test_fit_mode_writes_json_table_and_plots(tmp_path):
  data = _write_runs(tmp_path / "runs.csv")
  out = tmp_path / "out"
  proc = _run("--law=chinchilla", f"--data={data}", f"--out={out}", f"--grid_stride={STRIDE}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| alpha |" in proc.stdout and "| parameter | value |" in proc.stdout
  report = json.loads((out / "fit.json").read_text())
  assert set(report["params"]) == {"A", "B", "E", "alpha", "beta"}
  assert report["points"] == 15 and report["starts"] == 45 and report["grid_stride"] == 100
  assert report["theta"].keys() == {"a", "b", "e", "alpha", "beta"}
  for name in ("alpha", "beta", "E"):
    assert report["params"][name] == pytest.approx(TRUTH[name], rel=1e-3), name
  a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
  assert report["allocation_exponents"]["a"] == pytest.approx(a_true, abs=1e-3)
  assert report["isoflop"]["budgets"] == 3 and report["isoflop"]["a"] == pytest.approx(a_true, abs=1e-6)
  if importlib.util.find_spec("matplotlib") is None:  # plots are an optional extra
    assert report["plots"] == [] and "no plots" in proc.stdout
  else:
    assert sorted(os.path.basename(p) for p in report["plots"]) == ["fit.png", "frontier.png", "isoflop.png"]
    for p in report["plots"]:
      assert os.path.getsize(p) > 1000


@pytest.mark.parametrize("args,match", [
    (["--law=chinchilla", "--data={missing}"], "no such file"),
    (["--law=kaplan2020", "--data={data}"], "unknown law"),
    (["--law=chinchilla", "--data={bad}"], "lacks the columns \\['D'\\]"),
    (["--data={data}"], "give --law and --data"),
    (["--reproduce=nonesuch"], "unknown reproduction"),
    (["--law=chinchilla", "--data={binary}"], "is not a UTF-8 CSV text file"),
    (["--law=chinchilla", "--data={nul}"], "column 'N' has a value that is not a number"),
    (["--law=chinchilla", "--format=epoch", "--data={binary}"], "is not a UTF-8 CSV text file"),
])
def test_usage_errors(tmp_path, args, match):
  data = _write_runs(tmp_path / "runs.csv")
  bad = tmp_path / "bad.csv"
  bad.write_text("N,loss\n1e9,2.5\n")
  binary = tmp_path / "runs.bin"
  binary.write_bytes(bytes(range(256)) * 8)  # 0x80 and above: not UTF-8
  nul = tmp_path / "nul.csv"
  nul.write_bytes(b"N,D,loss\n1\x00,2,3\n")  # valid UTF-8, but a NUL inside the CSV
  args = [a.format(missing=tmp_path / "nope.csv", data=data, bad=bad, binary=binary, nul=nul) for a in args]
  proc = _run(*args, f"--out={tmp_path / 'out'}")
  assert proc.returncode == 1
  # The message alone, on one line: no traceback, no 60 lines of --help.
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fit_scaling.py: "), proc.stderr[-3000:]
  assert re.search(match, lines[0]) and lines[0].endswith("(see --help)"), lines[0]
  assert "Traceback" not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def script():
  """experiments/fit_scaling.py as a module (its flags are defined once per test process)."""
  spec = importlib.util.spec_from_file_location("fit_scaling_under_test", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bootstrap_intervals_from_real_refits(script, tmp_path, monkeypatch):
  """--bootstrap through the adapter into the real pairs bootstrap (20 resamples of 15 noisy points): each
  interval holds the estimate and has width; a seed gives the same intervals, another seed others; and twice the
  data's noise gives about twice the widths (small noise: the refits are linear in it), which no stand-in for the
  refits would."""
  from cce_jax.scaling import bootstrap
  calls = []

  def spy(law, x, loss, **kwargs):
    calls.append(dict(law=law.name, points=len(loss), **{k: kwargs[k] for k in ("n_resamples", "seed")},
                      kwargs=sorted(set(kwargs) - {"n_resamples", "seed", "weights"})))
    return bootstrap.pairs_bootstrap(law, x, loss, **kwargs)

  monkeypatch.setitem(sys.modules, "cce_jax.scaling.bootstrap", types.SimpleNamespace(pairs_bootstrap=spy))
  monkeypatch.setattr(script, "write_plots", lambda *args, **kwargs: [])  # the plots have their own test

  def fit(noise, seed):
    data = _write_runs(tmp_path / f"runs_{noise}.csv", weight=False, noise=noise)
    return script.fit_command(law_name="chinchilla", data=str(data), out=str(tmp_path / "out"), resamples=20,
                              seed=seed, grid_stride=int(STRIDE))

  report = fit(1e-3, seed=3)
  assert calls[0] == dict(law="chinchilla", points=15, n_resamples=20, seed=3,
                          kwargs=["delta", "init", "reduction"])
  boot = report["bootstrap"]
  assert boot["resamples"] == 20 and boot["level"] == 0.95 and boot["intervals"].keys() == report["params"].keys()
  for name, ci in boot["intervals"].items():
    assert ci["lo"] < report["params"][name] < ci["hi"] and ci["se"] > 0, (name, ci, report["params"][name])
  assert fit(1e-3, seed=3)["bootstrap"]["intervals"] == boot["intervals"]
  other = fit(1e-3, seed=4)["bootstrap"]["intervals"]
  assert all(other[name] != ci for name, ci in boot["intervals"].items())
  noisier = fit(2e-3, seed=3)["bootstrap"]["intervals"]
  width = lambda ci: ci["hi"] - ci["lo"]
  for name in ("E", "alpha", "beta"):
    ratio = width(noisier[name]) / width(boot["intervals"][name])
    assert 1.5 < ratio < 3.0, (name, ratio)
  saved = json.loads((tmp_path / "out" / "fit.json").read_text())
  assert saved["bootstrap"]["intervals"]["alpha"] == noisier["alpha"]
  assert "95% interval" in script.parameter_table(report)


def test_bootstrap_without_the_module_is_a_clear_error(script, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "cce_jax.scaling.bootstrap", None)
  with pytest.raises(app.UsageError, match="--bootstrap needs cce_jax.scaling.bootstrap"):
    script.bootstrap_draws(scaling.CHINCHILLA, np.ones((5, 2)), np.ones(5), None, resamples=2, seed=0,
                           fit_kwargs={})


def test_plots_are_skipped_without_matplotlib(script, tmp_path, monkeypatch, capsys):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                      real_find_spec(name, *a))
  theta = np.array([6.0, 6.0, 0.5, 0.34, 0.28])
  assert script.write_plots(scaling.CHINCHILLA, theta, np.ones((3, 2)), np.ones(3), str(tmp_path)) == []
  assert "matplotlib is not installed" in capsys.readouterr().out
  assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ reproductions


def test_registry_names_the_reproductions_and_reports_missing_modules(monkeypatch):
  assert {"epoch_chinchilla", "porian", "muennighoff", "gadre", "luo_schedules"} <= set(reproduce.REPRODUCTIONS)
  for name in ("epoch_chinchilla", "porian"):
    module = reproduce.get(name)
    assert module.__doc__ and callable(module.run)
  monkeypatch.setitem(reproduce.REPRODUCTIONS, "nowhere", "cce_jax.scaling.reproduce.nowhere")
  with pytest.raises(ValueError, match="registered but its module cce_jax.scaling.reproduce.nowhere"):
    reproduce.get("nowhere")
  with pytest.raises(ValueError, match="unknown reproduction"):
    reproduce.get("nonesuch")


def test_rows_and_markdown_table():
  with pytest.raises(ValueError, match=r"lacks \['published'\]"):
    reproduce.check_rows("x", [{"quantity": "q", "reproduced": 1.0}])
  with pytest.raises(ValueError, match="non-empty list"):
    reproduce.check_rows("x", [])
  rows = reproduce.check_rows("x", [{"quantity": "a|b", "reproduced": 1.02, "published": 1.0, "note": "n"},
                                    {"quantity": "c", "reproduced": 3, "published": None}])
  table = reproduce.markdown_table({"x": rows})
  assert "| x | a\\|b | 1.02 | 1 | +2.00% | n |" in table
  assert "| x | c | 3 | — | — |  |" in table


def test_porian_exponents(script, tmp_path, monkeypatch):
  # Through the CLI's `all` path, with a registered module that is missing: it is reported and skipped.
  monkeypatch.setattr(reproduce, "REPRODUCTIONS", {"porian": "cce_jax.scaling.reproduce.porian",
                                                   "nowhere": "cce_jax.scaling.reproduce.nowhere"})
  report = script.reproduce_command(names="all", data_root=None, out=str(tmp_path))  # the packaged data
  assert "not in this checkout" in report["nowhere"]["error"]
  rows = {r["quantity"]: r for r in report["porian"]["rows"]}
  assert len(rows) == 20
  for quantity, row in rows.items():
    if "published N*" in quantity:  # the power-law step on the authors' own minima: their numbers
      assert row["reproduced"] == pytest.approx(row["published"], abs=2e-4), quantity
    else:  # parabolas instead of Akima interpolants: close, not equal
      assert row["reproduced"] == pytest.approx(row["published"], abs=0.04), quantity
  kaplan = rows["rw/base/long/kaplan/kaplan/train: a (N* ∝ C^a), IsoFLOP parabolas"]["reproduced"]
  tuned = rows["rw/tuned/short/const/standard/val: a (N* ∝ C^a), IsoFLOP parabolas"]["reproduced"]
  assert kaplan > 0.8 and abs(tuned - 0.5) < 0.01
  assert "| porian |" in (tmp_path / "reproductions.md").read_text()


def test_reproduce_epoch_chinchilla_end_to_end(tmp_path, epoch_cache):
  # No --data_root: the file comes from the download cache (filled from a local copy by the fixture).
  proc = _run("--reproduce=epoch_chinchilla", f"--out={tmp_path}", f"--grid_stride={STRIDE}",
              CCE_JAX_CACHE=str(epoch_cache))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("[1/1] epoch_chinchilla: ")
  assert "| epoch_chinchilla | (a) Huber-sum grid fit: alpha |" in proc.stdout
  assert (tmp_path / "reproductions.md").read_text() in proc.stdout
  report = json.loads((tmp_path / "reproductions.json").read_text())
  rows = {r["quantity"]: r for r in report["epoch_chinchilla"]["rows"]}
  for name in ("A", "B", "E", "alpha", "beta"):
    a = rows[f"(a) Huber-sum grid fit: {name}"]
    assert a["reproduced"] == pytest.approx(a["published"], rel=5e-4), name
    # The published stop is rounded to 3-4 significant digits.
    b = rows[f"(b) mean objective, L-BFGS-B stop: {name}"]
    assert b["reproduced"] == pytest.approx(b["published"], rel=2e-3), name
  assert rows["(b) mean objective, L-BFGS-B stop: iterations"]["reproduced"] <= 3


def test_reproduce_all_prints_a_line_as_each_finishes(script, tmp_path, monkeypatch, capsys):
  seen = []

  def fake_run(name, data_root, **options):
    seen.append(capsys.readouterr().out)  # what was printed before this reproduction started
    if name == "b":
      raise sources.DataUnavailable("no data for b")
    return [{"quantity": "q", "reproduced": 1.0, "published": 1.0}]

  monkeypatch.setattr(reproduce, "REPRODUCTIONS", {"a": "x.a", "b": "x.b", "c": "x.c"})
  monkeypatch.setattr(reproduce, "run", fake_run)
  report = script.reproduce_command(names="all", data_root=None, out=str(tmp_path))
  assert seen[0] == ""
  assert re.fullmatch(r"\[1/3\] a: 1 rows in \d+\.\d s\n", seen[1])
  assert seen[2] == "[2/3] b: FAILED (DataUnavailable; the message is printed at the end)\n"
  assert report["b"] == {"error": "no data for b"} and report["c"]["rows"]


def test_missing_data_is_an_error_naming_it(script, tmp_path, monkeypatch, capsys):
  # The pinned URL replaced by one that cannot be read: as offline, without touching the network.
  unreachable = dataclasses.replace(sources.EPOCH_CHINCHILLA, url=(tmp_path / "gone.csv").as_uri())
  monkeypatch.setitem(sources.DOWNLOADS, unreachable.folder, unreachable)
  with flagsaver.flagsaver():
    flags.FLAGS(["fit_scaling.py", "--reproduce=epoch_chinchilla,muennighoff", f"--out={tmp_path / 'out'}",
                 f"--data_root={tmp_path / 'empty'}"])
    with pytest.raises(SystemExit) as exit_info:
      script.main(["fit_scaling.py"])
  assert exit_info.value.code == 1
  out, err = capsys.readouterr()
  assert "[1/2] epoch_chinchilla: FAILED" in out and "[2/2] muennighoff: " in out and "| muennighoff |" in out
  message = err.strip()
  assert message.startswith("error: reproduction 'epoch_chinchilla' failed: ")
  for needed in ("epoch_chinchilla_replication/svg_extracted_data.csv", unreachable.url,
                 str(tmp_path / "empty"), "--data_root=DIR"):
    assert needed in message, needed
  assert not list(pathlib.Path(os.environ["CCE_JAX_CACHE"]).rglob("*.csv"))
