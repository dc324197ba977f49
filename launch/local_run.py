"""The `local` target: N JAX processes on this host with an explicit coordinator on localhost.

Each process gets JAX_COORDINATOR_ADDRESS (read by `jax.distributed.initialize`), JAX_NUM_PROCESSES and
JAX_PROCESS_ID (read by experiments/train.py --distributed, which passes them on), and its devices: with GPUs,
JAX_LOCAL_DEVICE_IDS names this process's share of them (read by jax); with simulated CPU devices, JAX_PLATFORMS=cpu
and XLA's host device count. The cluster variables of an enclosing SLURM or Open MPI job are dropped, so that jax's
auto-detection cannot mistake the local processes for that job's tasks.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time

_CLUSTER_PREFIXES = ("SLURM_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict, *, process_id: int, num_processes: int, port: int, gpus: int = 0,
                cpu_devices: int = 0, extra=()) -> dict:
  """The environment of local process `process_id` of `num_processes` (see the module docstring).

  gpus: the host's GPUs, split into equal contiguous shares (a multiple of num_processes); 0 leaves the devices
  alone. cpu_devices: simulated CPU devices per process (0: leave the platform alone).
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must lie in [0, {num_processes})")
  env = {k: v for k, v in base.items() if not k.startswith(_CLUSTER_PREFIXES)}
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id))
  if gpus:
    if gpus % num_processes:
      raise ValueError(f"--gpus_per_node={gpus} must be a multiple of --num_processes={num_processes}")
    share = gpus // num_processes
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(process_id * share + i) for i in range(share))
  if cpu_devices:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
  env.update(dict(extra))
  return env


def describe(envs: list[dict], base: dict, command: list[str]) -> str:
  """What each process runs: the variables that differ from this environment, then the command (shell syntax)."""
  lines = []
  for env in envs:
    changed = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if base.get(k) != v]
    dropped = sorted(k for k in base if k not in env)
    unset = f"env {' '.join('-u ' + k for k in dropped)} " if dropped else ""
    lines.append(f"{unset}{' '.join(changed)} {shlex.join(command)} &")
  lines.append("wait")
  return "\n".join(lines)


def _pump(stream, prefix: str):
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"{prefix}{line}")
    sys.stdout.flush()


def run(envs: list[dict], command: list[str], *, grace_s: float = 10.0) -> int:
  """Starts one process per environment, prefixes their output with [i], and returns the first non-zero exit status
  (0 if all succeed). When one fails, the others are given grace_s seconds and then terminated, since a
  multi-controller job cannot go on without every process."""
  procs, pumps = [], []
  for i, env in enumerate(envs):
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] "), daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)
  status, failed_at = 0, None
  while any(p.poll() is None for p in procs):
    codes = [p.returncode for p in procs if p.returncode]
    if codes and failed_at is None:
      status, failed_at = codes[0], time.time()
    if failed_at is not None and time.time() - failed_at > grace_s:
      for p in procs:
        if p.poll() is None:
          p.terminate()
    time.sleep(0.1)
  for pump in pumps:
    pump.join(timeout=5)
  return status or next((p.returncode for p in procs if p.returncode), 0)
