"""launch.py's dry runs against golden files (the sbatch scripts, JobSet YAML, TPU VM script, gcloud commands and
SkyPilot task a user would submit), `bash -n` on every shell script, the JobSet YAML against the JobSet schema,
gcloud's own flag lists, the SkyPilot task's shell, the template syntax and the one-line usage errors.

Regenerate the golden files after an intended change with CCE_UPDATE_GOLDEN=1 and read their diff.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

import launch
import render
import tpu_types
from tests.launch import jobset_schema

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
TRAIN = ["python", "experiments/train.py", "--config=experiments/configs/small.py", "--workdir=/shared/runs/small",
         "--distributed"]
CASES = {
    "slurm_2x8_gpus": ["slurm", "--nodes=2", "--gpus_per_node=8", "--partition=gpu", "--account=lm"],
    "slurm_one_task_per_node": ["slurm", "--nodes=4", "--gpus_per_node=4", "--one_task_per_node",
                                "--time=12:00:00", "--env=NCCL_DEBUG=WARN", "--sbatch=--exclusive",
                                "--remote_dir=/shared/cce_jax"],
    "slurm_cpu": ["slurm", "--nodes=2", "--name=cpu-smoke"],
    "k8s_gpu": ["k8s", "--nodes=2", "--gpus_per_node=8", "--image=ghcr.io/example/cce_jax:latest",
                "--pvc=runs:/shared", "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "--name=cce-small"],
    "k8s_tpu_v4_16": ["k8s", "--tpu_type=v4-16", "--image=us-docker.pkg.dev/p/r/cce_jax:1", "--max_restarts=3"],
    "k8s_tpu_v5e_2_slices": ["k8s", "--tpu_type=v5litepod-16", "--slices=2", "--image=us-docker.pkg.dev/p/r/cce:1",
                             "--pvc=runs:/shared"],
    "tpu_vm_v5e_16": ["tpu_vm", "--tpu_type=v5litepod-16", "--zone=us-west4-a", "--project=my-project"],
    "tpu_vm_v4_8_spot": ["tpu_vm", "--tpu_type=v4-8", "--zone=us-central2-b", "--spot", "--name=cce-v4"],
    "skypilot_2x8_h100": ["skypilot", "--nodes=2", "--gpus_per_node=8", "--accelerator=H100",
                          "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"],
    "skypilot_cpu_gcp": ["skypilot", "--nodes=3", "--cloud=gcp", "--name=cpu-smoke"],
    "tpu_vm_v6e_queued_2_slices": ["tpu_vm", "--tpu_type=v6e-256", "--slices=2", "--queued", "--zone=us-east5-b",
                                   "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true"],
}


def _dry_run(argv) -> str:
  out = io.StringIO()
  assert launch.main(argv + ["--dry_run", "--output_dir=/shared/launch", "--"] + TRAIN, out=out) == 0
  return out.getvalue().replace(str(launch.REPO), "<repo>")


def _sections(text) -> dict[str, str]:
  """{file path or "commands": its text} from a dry run's output."""
  parts = re.split(r"^# ---- (?:file )?(.*)\n", text, flags=re.M)
  return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_golden(case):
  got = _dry_run(CASES[case])
  path = GOLDEN / f"{case}.txt"
  if os.environ.get("CCE_UPDATE_GOLDEN"):
    path.write_text(got, encoding="utf-8")
  assert got == path.read_text(encoding="utf-8"), f"{case}: rendered output changed (CCE_UPDATE_GOLDEN=1 to accept)"


def _bash_n(text, what):
  out = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, check=False)
  assert out.returncode == 0, f"{what}: {out.stderr}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_shell_script_and_command_parses(case):
  for name, text in _sections(_dry_run(CASES[case])).items():
    if not name.endswith(".yaml"):  # sbatch and TPU VM scripts, and the commands to run
      _bash_n(text, f"{case}: {name}")


@pytest.mark.parametrize("name", ["slurm.sbatch", "tpu_vm.sh"])
def test_templates_parse_as_shell(name):
  _bash_n(render.template(name), name)


def _jobset(case):
  [text] = [t for name, t in _sections(_dry_run(CASES[case])).items() if name.endswith(".yaml")]
  return yaml.safe_load(text)


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if c.startswith("k8s")])
def test_jobset_yaml_fits_the_schema_and_the_run(case):
  doc = _jobset(case)
  assert jobset_schema.validate(doc) == []
  [rjob] = doc["spec"]["replicatedJobs"]
  job, pod = rjob["template"]["spec"], rjob["template"]["spec"]["template"]["spec"]
  [container] = pod["containers"]
  assert container["command"] == TRAIN
  assert job["parallelism"] == job["completions"] and job["completionMode"] == "Indexed"
  env = {e["name"]: e for e in container["env"]}
  name = doc["metadata"]["name"]
  pod0 = f"{name}-{rjob['name']}-0-0.{name}"  # JobSet's DNS name of pod 0 of job 0
  if "tpu" in case:
    tpu = tpu_types.parse(next(a.split("=")[1] for a in CASES[case] if a.startswith("--tpu_type")))
    assert job["parallelism"] == tpu.hosts and container["resources"]["limits"]["google.com/tpu"] == tpu.chips_per_host
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == tpu.topology
    multislice = rjob["replicas"] > 1
    assert ("MEGASCALE_NUM_SLICES" in env) == multislice
    if multislice:
      assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == pod0
  else:
    assert rjob["replicas"] == 1  # one Job: the completion index is the process id
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == f"{pod0}:{render.GPU_COORDINATOR_PORT}"
    assert env["JAX_NUM_PROCESSES"]["value"] == str(job["parallelism"])
    assert env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_skypilot_task_gives_each_node_what_train_py_reads(tmp_path):
  out = io.StringIO()
  assert launch.main(["skypilot", "--nodes=2", "--gpus_per_node=8", "--accelerator=H100", "--dry_run",
                      "--output_dir=/o", "--", "env"], out=out) == 0
  task = yaml.safe_load(_sections(out.getvalue())["/o/cce-train.sky.yaml"])
  assert task["num_nodes"] == 2 and task["resources"] == {"accelerators": "H100:8"}
  assert task["workdir"] == str(launch.REPO) and task["envs"]["PYTHONUNBUFFERED"] == "1"
  _bash_n(task["setup"], "setup")
  (tmp_path / ".venv" / "bin").mkdir(parents=True)
  (tmp_path / ".venv" / "bin" / "activate").write_text("", encoding="utf-8")
  got = subprocess.run(["bash", "-c", task["run"]], cwd=tmp_path, capture_output=True, text=True, check=True, env={
      "PATH": os.environ["PATH"], "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.8", "SKYPILOT_NUM_NODES": "2",
      "SKYPILOT_NODE_RANK": "1"}).stdout.splitlines()
  assert {"JAX_COORDINATOR_ADDRESS=10.0.0.7:55527", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=1"} <= set(got)


def test_the_schema_check_finds_wrong_types_and_unknown_fields():
  doc = _jobset("k8s_gpu")
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  job["parallelism"] = "2"
  job["template"]["spec"]["containers"][0]["envv"] = []
  job["template"]["spec"]["containers"][0]["env"][0]["value"] = True
  del doc["metadata"]["name"]
  problems = jobset_schema.validate(doc)
  assert len(problems) == 4, problems
  assert any(".parallelism: expected int" in p for p in problems)
  assert any("unknown field 'envv'" in p for p in problems)
  assert any("missing field 'name'" in p for p in problems)


def _gcloud_flags(subcommand) -> set[str]:
  out = subprocess.run(["gcloud", *subcommand, "--help"], capture_output=True, text=True, check=False,
                       env=dict(os.environ, TERM="dumb", CLOUDSDK_CORE_DISABLE_PROMPTS="1"), timeout=120)
  synopsis = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout).split("\nDESCRIPTION\n")[0]
  return set(re.findall(r"--[a-z][-a-z]*", synopsis)) | {"--project", "--format"}  # gcloud-wide flags


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="needs the gcloud CLI (no account or network)")
def test_gcloud_commands_use_flags_gcloud_has():
  used = {}
  for case in [c for c in CASES if c.startswith("tpu_vm")]:
    for match in re.finditer(r"gcloud compute tpus (tpu-vm|queued-resources) (\w+) ([^;|&\n]*)",
                             _sections(_dry_run(CASES[case]))["commands"]):
      used.setdefault((match.group(1), match.group(2)), set()).update(re.findall(r"--[a-z][-a-z]*", match.group(3)))
  assert len(used) == 6, used
  for (group, verb), flags in sorted(used.items()):
    known = _gcloud_flags(["compute", "tpus", group, verb])
    assert flags <= known, f"gcloud compute tpus {group} {verb} has no {sorted(flags - known)}"


def test_fill_blocks_lines_and_missing_values():
  text = "a: {{A}}\n  {{LIST}}\n{{#ON}}\non\n{{/ON}}\n{{#OFF}}\noff\n{{/OFF}}\n  {{EMPTY}}\nend\n"
  got = render.fill(text, {"A": 1, "LIST": "- x\n- y", "EMPTY": ""}, {"ON": True, "OFF": False})
  assert got == "a: 1\n  - x\n  - y\non\nend\n"
  with pytest.raises(render.RenderError, match="B"):
    render.fill("{{B}}", {})
  with pytest.raises(render.RenderError, match="ON"):
    render.fill("{{#ON}}\nx\n{{/ON}}\n", {})


def test_every_template_field_is_filled():
  for case in CASES:
    assert "{{" not in _dry_run(CASES[case]).replace("{{...}}", ""), case


@pytest.mark.parametrize("name, hosts, per_host, topology", [
    ("v4-8", 1, 4, "2x2x1"), ("v4-16", 2, 4, "2x2x2"), ("v5p-128", 16, 4, "4x4x4"), ("v5litepod-8", 1, 8, "2x4"),
    ("v5litepod-16", 4, 4, "4x4"), ("v6e-4", 1, 4, "2x2"), ("v6e-256", 64, 4, "16x16")])
def test_tpu_slice_shapes(name, hosts, per_host, topology):
  tpu = tpu_types.parse(name)
  assert (tpu.hosts, tpu.chips_per_host, tpu.topology) == (hosts, per_host, topology)
  assert tpu.hosts * tpu.chips_per_host == tpu.chips


@pytest.mark.parametrize("argv, message", [
    (["local", "python", "x.py"], "give the command after --"),
    (["local", "--"], "the command after -- is empty"),
    (["tpu_vm", "--tpu_type=v4-8", "--", "x"], "tpu_vm needs --zone"),
    (["k8s", "--gpus_per_node=8", "--", "x"], "k8s needs --image"),
    (["k8s", "--image=i", "--", "x"], "k8s needs --gpus_per_node or --tpu_type"),
    (["slurm", "--name=Big_Job", "--", "x"], "--name='Big_Job'"),
    (["tpu_vm", "--tpu_type=v5litepod-16", "--slices=2", "--zone=z", "--", "x"], "needs --queued"),
    (["tpu_vm", "--tpu_type=v5litepod-16", "--nodes=2", "--zone=z", "--", "x"], "has 4 host(s)"),
    (["k8s", "--tpu_type=v7-8", "--image=i", "--", "x"], "--tpu_type='v7-8'"),
    (["k8s", "--gpus_per_node=8", "--image=i", "--pvc=runs", "--", "x"], "--pvc='runs'"),
    (["slurm", "--env=NOVALUE", "--", "x"], "--env='NOVALUE'"),
    (["local", "--nodes=2", "--", "x"], "this host only"),
    (["skypilot", "--gpus_per_node=8", "--", "x"], "--gpus_per_node and --accelerator together"),
    (["skypilot", "--tpu_type=v4-8", "--", "x"], "does not take --tpu_type"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
  assert launch.main(argv, out=io.StringIO()) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err


def test_every_launch_command_in_the_docs_dry_runs():
  text = (launch.REPO / "docs" / "launch.md").read_text(encoding="utf-8")
  commands = [line for block in re.findall(r"```\n(.*?)```", text, flags=re.S)
              for line in block.replace("\\\n", " ").splitlines() if line.startswith("python launch/launch.py ")]
  commands = [c for c in commands if "TARGET" not in c]
  assert len(commands) >= 8
  for command in commands:
    argv = shlex.split(command)[2:]
    cut = argv.index("--")
    out = io.StringIO()
    assert launch.main(argv[:cut] + ["--dry_run", "--output_dir=/o"] + argv[cut:], out=out) == 0, command
    assert argv[cut + 2] in out.getvalue()  # the command's script (experiments/train.py, bench_loss.py)
