"""experiments/train.py as a process: SIGKILL mid-run and mid-save then resume; 8 simulated devices vs 1; what it
prints (no backend probes, a rerun's final metrics, one-line usage errors)."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from cce_jax.training import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _command(workdir, cache, steps=30):
  return [sys.executable, str(ROOT / "experiments" / "train.py"), "--config=" + str(ROOT / "experiments" /
                                                                                     "configs" / "tiny.py"),
          f"--workdir={workdir}", f"--config.data_cache={cache}", "--config.max_bytes=300000",
          "--config.vocab_size=320", "--config.seq_len=32", "--config.batch_size=8", f"--config.steps={steps}",
          "--config.model.D=32", "--config.model.H=2", "--config.model.KV=1", "--config.model.L=1",
          "--config.model.F=64", "--config.checkpoint_every=5", "--config.eval_every=10",
          "--config.eval_batches=2", "--config.plot=False", "--config.optim.warmup_steps=3"]


def _env(devices=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(workdir))}


def _newest_step(workdir):
  try:
    return max(_losses(workdir), default=0)
  except (FileNotFoundError, ValueError):
    return 0


def _run_until_killed(workdir, cache, kill_after_step):
  proc = subprocess.Popen(_command(workdir, cache), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while _newest_step(workdir) < kill_after_step:
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail(f"training stopped (rc {proc.returncode}) before step {kill_after_step}")
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def reference_run(cache, tmp_path_factory):
  """(workdir, the finished process) of a 30-step run."""
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, subprocess.run(_command(workdir, cache), env=_env(), check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference(reference_run):
  return _losses(reference_run[0])


def _deterministic_fields(record):
  """A metrics record without what depends on the machine's speed or memory (throughput, bytes in use)."""
  return {k: v for k, v in record.items() if "bytes" not in k and "per_s" not in k and "time" not in k}


def test_sigkill_mid_run_and_mid_save_then_resume_is_bitwise_identical(cache, reference_run, tmp_path):
  workdir = tmp_path / "killed"
  _run_until_killed(workdir, cache, kill_after_step=12)  # between checkpoints (10 saved, 11-12 lost)
  _run_until_killed(workdir, cache, kill_after_step=20)  # right after step 20's record: its save is in flight
  subprocess.run(_command(workdir, cache), env=_env(), check=True, capture_output=True)
  expected = metrics_lib.read_metrics(str(reference_run[0]))
  got = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in expected] == list(range(1, 31))
  assert [r["step"] for r in got] == list(range(1, 31))  # every step exactly once, in order, after two kills
  # Every logged field (learning rate, gradient norm, validation loss, not only the loss) equals the
  # uninterrupted run's: a resumed step counter or optimizer state that was off would show here.
  assert {"loss", "lr", "grad_norm"} <= set(got[-1])
  assert [_deterministic_fields(r) for r in got] == [_deterministic_fields(r) for r in expected]


def test_eight_simulated_devices_match_one(cache, reference, tmp_path):
  workdir = tmp_path / "eight"
  out = subprocess.run(_command(workdir, cache, steps=30) + ["--config.fsdp=True"], env=_env(devices=8),
                       check=True, capture_output=True, text=True)
  assert "8 devices" in out.stderr + out.stdout
  eight = _losses(workdir)
  assert sorted(eight) == sorted(reference)
  for step, loss in reference.items():
    assert eight[step] == pytest.approx(loss, rel=2e-4, abs=2e-4), step


def test_two_processes_match_one_with_two_devices(cache, tmp_path):
  """JAX's multi-controller runtime on CPU (gloo): 2 processes × 1 device train like 1 process × 2 devices."""
  two_devices = tmp_path / "two_devices"
  subprocess.run(_command(two_devices, cache, steps=12), env=_env(devices=2), check=True, capture_output=True)
  workdir = tmp_path / "two_processes"
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(_command(workdir, cache, steps=12) + [
      f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert "2 devices (cpu) in 2 process(es)" in outs[0]
  single, multi = _losses(two_devices), _losses(workdir)
  assert sorted(multi) == list(range(1, 13))  # one writer: each step once
  for step, loss in single.items():
    assert multi[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step


def test_quiet_about_absent_backends_and_a_rerun_prints_the_final_metrics(cache, reference_run, tmp_path):
  workdir, first = reference_run
  assert "Unable to initialize backend" not in first.stderr
  assert "starting from step 0: no checkpoint" in first.stderr
  final = [line for line in first.stdout.splitlines() if line.startswith("final: ")]
  assert len(final) == 1 and "'step': 30" in final[0] and "'val_loss'" in final[0]
  rerun_dir = tmp_path / "rerun"
  shutil.copytree(workdir, rerun_dir)
  rerun = subprocess.run(_command(rerun_dir, cache), env=_env(), check=True, capture_output=True, text=True)
  assert "step 30 of 30 is done already" in rerun.stderr
  assert [line for line in rerun.stdout.splitlines() if line.startswith("final: ")] == final


def test_usage_errors_are_one_line(cache, tmp_path):
  """An unknown field (while flags parse), a missing config file, a workdir that is a file (in main); the library
  tests check the other errors (tests/training/test_validate.py, test_run_messages.py)."""
  (tmp_path / "a_file").write_text("")
  config = "--config=" + str(ROOT / "experiments" / "configs" / "tiny.py")
  cases = [([config, f"--workdir={tmp_path}/w", "--config.optim.lrr=1"],
            "unknown config field 'optim.lrr'; did you mean 'optim.lr'?"),
           ([f"--config={tmp_path}/missing.py", f"--workdir={tmp_path}/w"], "No such file or directory"),
           ([config, f"--workdir={tmp_path}/a_file", f"--config.data_cache={cache}"], "is a file, not a directory")]
  for args, message in cases:
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), *args], env=_env(),
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2, (args, out.stderr[-2000:])
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("train.py: error: "), (args, out.stderr)
    assert message in out.stderr, (args, out.stderr)
  assert not os.path.exists(tmp_path / "w")
