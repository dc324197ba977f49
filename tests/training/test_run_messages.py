"""What a run says before and after training: why it starts from step 0, a finished run's final metrics, and
one-line errors for a bad config, a workdir that is a file or holds a tokenizer trained on other data."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from cce_jax import data as data_lib
from cce_jax.training import trainer
from cce_jax.training import validate
from tests.training.test_trainer import small_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("data_cache")


def _config(cache, **overrides):
  return small_config(cache, **{"steps": 4, "checkpoint_every": 2, "eval_every": 4, "max_bytes": 100_000,
                                **overrides})


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
  """(workdir, the first call's returned record, its log)."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  handler = _Capture()
  logging.getLogger().addHandler(handler)
  previous = logging.getLogger().level
  logging.getLogger().setLevel(logging.INFO)
  try:
    record = trainer.train(_config(cache), workdir)
  finally:
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(previous)
  return workdir, record, "\n".join(handler.lines)


class _Capture(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def test_a_fresh_run_says_it_starts_from_step_0(finished):
  workdir, record, log = finished
  assert f"starting from step 0: no checkpoint in {os.path.join(workdir, 'checkpoints')}" in log
  assert record["step"] == 4 and "val_loss" in record


def test_rerunning_a_finished_run_returns_its_final_metrics(cache, finished, caplog):
  workdir, record, _ = finished
  with caplog.at_level(logging.INFO):
    again = trainer.train(_config(cache), workdir)
  assert again == record
  assert "step 4 of 4 is done already" in caplog.text


def test_all_checkpoints_unreadable_says_so(cache, finished, tmp_path, caplog):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(finished[0], workdir)
  for step in os.listdir(os.path.join(workdir, "checkpoints")):
    shutil.rmtree(os.path.join(workdir, "checkpoints", step, "state"))
  with caplog.at_level(logging.INFO):
    assert trainer.train(_config(cache), workdir, stop_at=0) == {}  # restores, initialises, trains nothing
  assert "starting from step 0: none of the 2 checkpoint(s)" in caplog.text
  assert "is readable (moved to" in caplog.text


def test_a_tokenizer_trained_on_other_data_stops_the_run(cache, finished, tmp_path):
  workdir = str(tmp_path / "other_data")
  shutil.copytree(finished[0], workdir)
  (tmp_path / "text.txt").write_text("other data " * 2000)
  with pytest.raises(data_lib.DataError, match="was trained on data='stdlib' with vocab_size=320"):
    trainer.train(_config(cache, data=str(tmp_path / "*.txt")), workdir)


def test_bad_config_and_workdir_are_errors_before_anything_runs(cache, tmp_path):
  with pytest.raises(validate.ConfigError, match="optim.lr=-0.001 must be > 0"):
    trainer.train(_config(cache, optim=dict(lr=-1e-3)), str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")
  (tmp_path / "a_file").write_text("")
  with pytest.raises(validate.ConfigError, match="is a file, not a directory"):
    trainer.train(_config(cache), str(tmp_path / "a_file"))
  with pytest.raises(validate.ConfigError, match="cannot create workdir"):
    trainer.train(_config(cache), str(tmp_path / "a_file" / "run"))
