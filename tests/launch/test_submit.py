"""launch.py without --dry_run: it writes the files and runs the cluster tools. The tools are stand-ins on PATH that
record their arguments and do on this host what the real ones do remotely: `sbatch` runs the batch script, whose
`srun` starts the command; `gcloud ... scp` copies into a worker's home directory and `gcloud ... ssh` runs the
command there, so that the TPU VM script unpacks the packed code, sets up once and runs the command in it."""

from __future__ import annotations

import io
import os
import pathlib
import tarfile

import pytest

import launch

_STUBS = {
    "sbatch": """echo "sbatch $*" >> "$STUB_LOG"
SLURM_JOB_ID=42 SLURM_JOB_NODELIST=localhost bash "$1" && echo "Submitted batch job 42"
""",
    "srun": """echo "srun $*" >> "$STUB_LOG"
while [[ "$1" == --* ]]; do shift; done
SLURM_PROCID=0 SLURM_LOCALID=0 "$@"
""",
    "kubectl": """echo "kubectl $*" >> "$STUB_LOG"
""",
    "sky": """echo "sky $*" >> "$STUB_LOG"
""",
    "gcloud": """echo "gcloud $*" >> "$STUB_LOG"
verb="$3 $4"
case "$verb" in
  "tpu-vm describe") exit 1 ;;  # no such TPU VM yet
  "tpu-vm scp") shift 4; for a in "$@"; do [[ "$a" == -* || "$a" == *: ]] || cp "$a" "$WORKER_HOME/"; done ;;
  "tpu-vm ssh") for a in "$@"; do [[ "$a" == --command=* ]] && (cd "$WORKER_HOME" && HOME="$WORKER_HOME" \
                  bash -c "${a#--command=}"); done ;;
esac
""",
}


@pytest.fixture
def tools(tmp_path, monkeypatch):
  """(log of the tools' command lines, the TPU worker's home directory)."""
  bin_dir, home = tmp_path / "bin", tmp_path / "worker_home"
  bin_dir.mkdir()
  home.mkdir()
  for name, body in _STUBS.items():
    (bin_dir / name).write_text("#!/bin/bash\nset -euo pipefail\n" + body, encoding="utf-8")
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "tools.log"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("STUB_LOG", str(log))
  monkeypatch.setenv("WORKER_HOME", str(home))
  return log, home


def _launch(capfd, argv):
  status = launch.main(argv, out=io.StringIO())
  captured = capfd.readouterr()
  return status, captured.out + captured.err


def test_slurm_writes_the_script_and_submits_it(tools, tmp_path, capfd):
  log, _ = tools
  status, out = _launch(capfd, [
      "slurm", "--gpus_per_node=2", "--one_task_per_node", f"--output_dir={tmp_path / 'out'}", "--",
      "python3", "-c", "import os; print('task sees GPUs', os.environ['JAX_LOCAL_DEVICE_IDS'])"])
  assert status == 0, out
  script = tmp_path / "out" / "cce-train.sbatch"
  assert "--ntasks-per-node=1" in script.read_text(encoding="utf-8")
  assert "task sees GPUs 0,1" in out and "Submitted batch job 42" in out
  assert log.read_text(encoding="utf-8").splitlines() == [f"sbatch {script}", "srun --kill-on-bad-exit=1 python3 -c "
                                                          "import os; print('task sees GPUs', "
                                                          "os.environ['JAX_LOCAL_DEVICE_IDS'])"]


def test_tpu_vm_packs_creates_copies_and_runs_on_the_workers(tools, tmp_path, capfd):
  log, home = tools
  out_dir = tmp_path / "out"
  setup = "mkdir -p .venv/bin && touch .venv/bin/activate && echo setting up"
  argv = ["tpu_vm", "--tpu_type=v4-16", "--zone=us-central2-b", f"--output_dir={out_dir}", f"--setup={setup}",
          "--env=GREETING=hello", "--", "python3", "-c",
          "import os, pathlib; print(os.environ['GREETING'], pathlib.Path('launch/launch.py').is_file())"]
  status, out = _launch(capfd, argv)
  assert status == 0, out
  calls = [line.split()[:5] for line in log.read_text(encoding="utf-8").splitlines()]
  assert calls == [["gcloud", "compute", "tpus", "tpu-vm", verb] for verb in ("describe", "create", "scp", "ssh")]
  with tarfile.open(out_dir / "cce-train.tar.gz") as tar:
    names = set(tar.getnames())
  assert "launch/launch.py" in names and not any(n.startswith((".venv/", ".git/")) for n in names)
  assert "hello True" in (home / "cce-train.log").read_text(encoding="utf-8")
  assert (home / "cce_jax" / ".setup_done").is_file()
  # A second run reuses the worker's environment: no setup.
  status, out = _launch(capfd, argv)
  assert status == 0 and "setting up" not in out and "hello True" in out, out


def test_k8s_and_skypilot_write_their_file_and_hand_it_to_the_tool(tools, tmp_path, capfd):
  log, _ = tools
  for argv, tool, name in [(["k8s", "--gpus_per_node=8", "--image=i"], "kubectl apply -f", "cce-train.yaml"),
                           (["skypilot", "--gpus_per_node=8", "--accelerator=H100"], "sky launch -c cce-train",
                            "cce-train.sky.yaml")]:
    status, out = _launch(capfd, argv + [f"--output_dir={tmp_path}", "--", "python", "x.py"])
    assert status == 0, out
    assert (tmp_path / name).is_file()
    assert log.read_text(encoding="utf-8").splitlines()[-1] == f"{tool} {tmp_path / name}"


def test_a_failing_tool_stops_the_launch_with_one_line(tools, tmp_path, capfd):
  (pathlib.Path(os.environ["PATH"].split(os.pathsep)[0]) / "kubectl").write_text("#!/bin/bash\nexit 3\n")
  status, out = _launch(capfd, ["k8s", "--gpus_per_node=8", "--image=i", f"--output_dir={tmp_path}", "--", "x"])
  assert status == 3
  assert "launch.py: error: exit status 3 from: create the JobSet" in out
