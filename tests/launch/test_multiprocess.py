"""Real multi-process runs of experiments/train.py --distributed on this host (CPU, gloo), tiny model, 6 steps:

- two processes with the environment SLURM gives its tasks (SLURM_JOB_ID, SLURM_STEP_NODELIST=localhost,
  SLURM_NTASKS=2, SLURM_PROCID, SLURM_LOCALID), so that `jax.distributed.initialize()` finds everything itself;
- `launch.py local --num_processes=2`, which starts them with an explicit coordinator on localhost.

Both form one 2-process runtime and match one process with two simulated devices: the same losses, metrics written
once per step, and a checkpoint that reads back to the same parameters. The one-process run and the SLURM pair run
at once, and XLA compiles fast at optimization level 0 into a cache that launch.py's pair then reads: about 50 s of
CPU time in all. Skipped when no localhost port can be opened; marked `multiprocess`.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cce_jax.training import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 4


def _port_in(low: int, high: int) -> int | None:
  """A port in [low, high] that is free now, or None."""
  for port in np.random.default_rng().permutation(np.arange(low, high + 1))[:200]:
    with socket.socket() as s:
      try:
        s.bind(("localhost", int(port)))
      except OSError:
        continue
      return int(port)
  return None


pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(_port_in(61440, 65535) is None, reason="no free localhost port to coordinate on")]


def _train(workdir, cache, *extra):
  return [sys.executable, str(ROOT / "experiments" / "train.py"),
          f"--config={ROOT / 'experiments' / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
          f"--config.data_cache={cache}", "--config.max_bytes=300000", "--config.vocab_size=320",
          "--config.seq_len=32", "--config.batch_size=8", f"--config.steps={STEPS}", "--config.model.D=32",
          "--config.model.H=2", "--config.model.KV=1", "--config.model.L=1", "--config.model.F=64",
          "--config.checkpoint_every=0", "--config.eval_every=0", "--config.plot=False",
          "--config.optim.warmup_steps=2", *extra]


def _clean_env(cache, devices=1):
  """This environment without cluster or JAX variables; CPU; XLA's fastest compilation (every run the same) and
  one compilation cache, from which the second pair of processes takes the first pair's programs."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "XLA_FLAGS", "OMPI_"))}
  return dict(env, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache / "xla"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{"one": one process x 2 devices, "slurm": the SLURM-environment pair, "local": launch.py local}: each
  (workdir, [combined output per process], [exit status per process])."""
  root = tmp_path_factory.mktemp("multiprocess")
  cache = root / "cache"
  one = subprocess.Popen(_train(root / "one", cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_clean_env(cache, devices=2))
  # jax's SLURM coordinator port is 61440 + SLURM_JOB_ID % 4096: choose the job id that lands on a free port.
  job_id = _port_in(61440, 65535) - 61440 + 4096 * 7
  slurm = [subprocess.Popen(_train(root / "slurm", cache, "--distributed"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(_clean_env(cache), SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost",
                                     SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
           for i in range(2)]
  procs, result = [one] + slurm, {}
  try:
    result["one"] = (root / "one", [one.communicate(timeout=240)[0]], [one.returncode])
    result["slurm"] = (root / "slurm", [p.communicate(timeout=240)[0] for p in slurm], [p.returncode for p in slurm])
    procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / "launch.py"), "local", "--num_processes=2",
                                   "--", *_train(root / "local", cache, "--distributed")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_clean_env(cache)))
    result["local"] = (root / "local", [procs[-1].communicate(timeout=240)[0]], [procs[-1].returncode])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert one.returncode == 0, result["one"][1][0][-3000:]
  return result


def _state(workdir):
  """(step, parameters and optimizer state as NumPy) of the newest checkpoint, read back with Orbax."""
  step = ocp.CheckpointManager(str(workdir / "checkpoints")).latest_step()
  path = str(workdir / "checkpoints" / str(step) / "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path)
  tree = getattr(getattr(tree, "item_metadata", tree), "tree", getattr(tree, "item_metadata", tree))
  restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return step, checkpointer.restore(path, restore_args=restore)


def _check_matches_one_process(runs, name):
  workdir, outs, codes = runs[name]
  assert codes == [0] * len(codes), "\n".join(o[-3000:] for o in outs)
  assert "2 devices (cpu) in 2 process(es)" in outs[0]
  records = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # process 0 alone writes: each step once
  reference = {r["step"]: r for r in metrics_lib.read_metrics(str(runs["one"][0]))}
  for r in records:
    for key in ("loss", "grad_norm"):
      assert r[key] == pytest.approx(reference[r["step"]][key], rel=1e-5, abs=1e-6), (r["step"], key)
  step, state = _state(workdir)
  ref_step, ref_state = _state(runs["one"][0])
  assert step == ref_step == STEPS
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_slurm_environment_and_launch_local_two_processes_match_one(runs):
  # One test, so that pytest-xdist does not start the module's runs once per worker.
  _check_matches_one_process(runs, "slurm")
  _check_matches_one_process(runs, "local")
  out = runs["local"][1][0]
  assert "launch.py: starting 2 processes" in out and "[1] " in out  # both processes' output, prefixed
  assert "launch.py: 2 processes finished, exit status 0" in out
