"""The training loop: the loss falls, resume is exact, damaged checkpoints are skipped, NaN stops the run."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from benchmarks.linear_cross_entropy import harness
from benchmarks.linear_cross_entropy import inputs
from cce_jax.training import checkpoint as checkpoint_lib
from cce_jax.training import config as config_lib
from cce_jax.training import hidden_states
from cce_jax.training import metrics as metrics_lib
from cce_jax.training import trainer


def small_config(cache, **overrides):
  c = config_lib.base_config()
  c.data_cache = str(cache)
  c.max_bytes = 300_000
  c.vocab_size = 320
  c.seq_len = 32
  c.batch_size = 8
  c.steps = 12
  c.model.update(D=32, H=2, KV=1, L=1, F=64, dtype="float32")
  c.optim.update(lr=1e-2, warmup_steps=2)
  c.checkpoint_every = 3
  c.keep_checkpoints = 10
  c.eval_every = 6
  c.eval_batches = 2
  c.plot = False
  c.update(overrides)
  return c


def losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def straight_run(cache, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  trainer.train(small_config(cache), workdir)
  return workdir


def test_loss_falls_and_outputs_exist(straight_run):
  history = losses(straight_run)
  assert sorted(history) == list(range(1, 13))
  assert history[12] < history[1] - 0.5, history
  records = metrics_lib.read_metrics(straight_run)
  assert "val_loss" in records[5] and "val_loss" in records[11]
  assert sorted(int(s) for s in os.listdir(os.path.join(straight_run, "checkpoints"))) == [3, 6, 9, 12]
  assert os.path.exists(os.path.join(straight_run, "tokenizer.json"))


def _deterministic_fields(record):
  """A metrics record without what depends on the machine's speed or memory (throughput, bytes in use)."""
  return {k: v for k, v in record.items() if "bytes" not in k and "per_s" not in k}


def test_resume_is_bitwise_identical(cache, straight_run, tmp_path):
  """Every logged field (learning rate, gradient norm, validation loss, not only the loss, which a reset step
  counter leaves unchanged) equals the uninterrupted run's, and the state's own step counter (which sets the
  logged learning rate) equals its checkpoint's step."""
  workdir = str(tmp_path / "resumed")
  trainer.train(small_config(cache), workdir, stop_at=7)  # checkpoints at 3, 6 and the final 7
  shutil.rmtree(os.path.join(workdir, "checkpoints", "7"))  # as if killed after step 7 ran but before it saved
  trainer.train(small_config(cache), workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir, every=0, keep=1 << 30)
  try:
    step, state, _, _ = ckpt.restore_latest(trainer.setup(small_config(cache), workdir).state)
  finally:
    ckpt.close()
  assert step == int(state["step"]) == 12
  got, want = metrics_lib.read_metrics(workdir), metrics_lib.read_metrics(straight_run)
  assert {"loss", "lr", "grad_norm", "val_loss"} <= set(got[-1])
  assert [_deterministic_fields(r) for r in got] == [_deterministic_fields(r) for r in want]


def test_damaged_checkpoint_falls_back_to_an_older_one(cache, straight_run, tmp_path):
  workdir = str(tmp_path / "damaged")
  shutil.copytree(straight_run, workdir)
  for step in (9, 12):
    state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
    for root, _, files in os.walk(state_dir):
      for f in files:
        if not f.startswith("_"):
          os.remove(os.path.join(root, f))
  record = trainer.train(small_config(cache, steps=12), workdir)
  assert record["step"] == 12
  assert losses(workdir) == losses(straight_run)
  assert sorted(os.listdir(os.path.join(workdir, "unreadable_checkpoints"))) == ["12", "9"]  # kept, not deleted


def test_non_finite_loss_stops_with_the_step(cache, tmp_path):
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    trainer.train(small_config(cache, steps=30, optim=dict(lr=1e6, warmup_steps=0, grad_clip=0.0)), workdir)
  records = metrics_lib.read_metrics(workdir)
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert all(s <= records[-1]["step"] for s in saved)


def test_dump_hidden_states_for_the_benchmark(straight_run, tmp_path):
  out = str(tmp_path / "hidden.npz")
  info = hidden_states.dump(straight_run, out, tokens=100)
  assert info["step"] == 12 and info["e"] == (100, 32) and info["c"] == (320, 32)
  e, c, targets = inputs.load_lm(out, np.float32)
  records = metrics_lib.read_metrics(straight_run)
  loss = float(harness.naive_loss(e, c, targets, None))
  assert abs(loss - records[-1]["val_loss"]) < 0.3  # the same model on (part of) the same validation data
