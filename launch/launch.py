r"""Starts one experiment command as a multi-process JAX run: this host, SLURM, Cloud TPU VMs, Kubernetes, SkyPilot.

  python launch/launch.py TARGET [flags] -- COMMAND...

  python launch/launch.py local --num_processes=2 --cpu_devices=1 -- \
      python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/cce_tiny2 --distributed
  python launch/launch.py slurm --nodes=2 --gpus_per_node=8 --dry_run -- python experiments/train.py ...
  python launch/launch.py tpu_vm --tpu_type=v5litepod-16 --zone=us-west4-a -- python experiments/train.py ...
  python launch/launch.py k8s --gpus_per_node=8 --nodes=4 --image=IMAGE -- python experiments/train.py ...
  python launch/launch.py skypilot --nodes=2 --gpus_per_node=8 --accelerator=H100 -- python experiments/train.py ...

The command is the same everywhere; with experiments/train.py, pass --distributed and a --workdir that every
process can reach. Every process calls `jax.distributed.initialize()`, which finds its process id, the process
count and the coordinator from what each cluster provides (docs/launch.md lists what, target by target). The
templates are the plain files beside this one (slurm.sbatch, jobset_gpu.yaml, jobset_tpu.yaml, tpu_vm.sh,
skypilot.yaml).

--dry_run prints every file it would write and every command it would run, and touches nothing; without it, the
files go to --output_dir and the commands run (sbatch, gcloud, kubectl apply, sky launch), each printed first.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

import local_run
import render
import tpu_types

TARGETS = ("local", "slurm", "tpu_vm", "k8s", "skypilot")
REPO = pathlib.Path(__file__).resolve().parents[1]


class LaunchError(ValueError):
  """A bad combination of flags; printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="launch.py", usage="launch.py TARGET [flags] -- COMMAND...",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("target", choices=TARGETS)
  common = parser.add_argument_group("every target")
  common.add_argument("--name", default="cce-train", help="job / TPU VM / JobSet name (lower case, digits, '-')")
  common.add_argument("--nodes", type=int, default=1, help="hosts (GPU targets); TPU types fix their own")
  common.add_argument("--gpus_per_node", type=int, default=0, help="GPUs per host (0: none)")
  common.add_argument("--tpu_type", help="Cloud TPU accelerator type, e.g. v5litepod-16, v4-32, v6e-8")
  common.add_argument("--slices", type=int, default=1, help="TPU slices (multislice over the data-center network)")
  common.add_argument("--env", action="append", metavar="NAME=VALUE", help="set in every process (repeatable)")
  common.add_argument("--output_dir", help="where rendered files go (default: $TMPDIR/cce_launch/NAME)")
  common.add_argument("--remote_dir", help="the code's directory on the cluster (slurm: --chdir; tpu_vm: "
                      "relative to the home directory, default cce_jax)")
  common.add_argument("--dry_run", action="store_true", help="print the files and commands; write and run none")
  local = parser.add_argument_group("local")
  local.add_argument("--num_processes", type=int, help="processes (default: one per GPU, or 1)")
  local.add_argument("--cpu_devices", type=int, default=0, help="simulated CPU devices per process (0: off)")
  local.add_argument("--port", type=int, default=0, help="coordinator port (local: 0 picks a free one; k8s: "
                     f"default {render.GPU_COORDINATOR_PORT})")
  slurm = parser.add_argument_group("slurm")
  slurm.add_argument("--one_task_per_node", action="store_true", help="one process per node holding all its "
                     "GPUs (default: one per GPU)")
  slurm.add_argument("--time", default="01:00:00", help="wall-clock limit")
  slurm.add_argument("--partition")
  slurm.add_argument("--account")
  slurm.add_argument("--log", default="%x-%j.out", help="sbatch --output pattern")
  slurm.add_argument("--sbatch", action="append", metavar="OPTION", help="extra #SBATCH option, e.g. --mem=0")
  tpu = parser.add_argument_group("tpu_vm (--setup: skypilot too)")
  tpu.add_argument("--zone")
  tpu.add_argument("--project")
  tpu.add_argument("--tpu_version", help="TPU VM runtime (default: the generation's, e.g. v2-alpha-tpuv5-lite)")
  tpu.add_argument("--queued", action="store_true", help="request a queued resource (needed for --slices > 1)")
  tpu.add_argument("--spot", action="store_true")
  tpu.add_argument("--setup", help="shell commands run once per worker, creating .venv (default: uv makes a "
                   "Python 3.12 .venv with the package and jax[tpu])")
  k8s = parser.add_argument_group("k8s")
  k8s.add_argument("--image", help="container image holding the code and its dependencies")
  k8s.add_argument("--max_restarts", type=int, default=0, help="JobSet restarts after a failure")
  k8s.add_argument("--pvc", metavar="CLAIM:/PATH", help="mount a PersistentVolumeClaim (a shared --workdir)")
  k8s.add_argument("--tpu_topology", help="GKE TPU topology, e.g. 4x4 (default: from --tpu_type)")
  sky = parser.add_argument_group("skypilot (also --setup, --port)")
  sky.add_argument("--accelerator", help="GPU model as SkyPilot names it, e.g. H100, A100-80GB")
  sky.add_argument("--cloud", help="pin a cloud (default: SkyPilot picks the cheapest)")
  return parser


def parse(argv: list[str]):
  """(flags, command) from `TARGET [flags] -- COMMAND...`; LaunchError for what argparse cannot check."""
  if "--" not in argv:
    if {"-h", "--help"} & set(argv):
      _parser().parse_args(argv)
    raise LaunchError("give the command after --, e.g. launch.py local -- python experiments/train.py ...")
  cut = argv.index("--")
  args, command = _parser().parse_args(argv[:cut]), argv[cut + 1:]
  if not command:
    raise LaunchError("the command after -- is empty")
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", args.name):
    raise LaunchError(f"--name={args.name!r}: lower-case letters, digits and '-', starting with a letter")
  if args.nodes < 1 or args.gpus_per_node < 0 or args.slices < 1:
    raise LaunchError("--nodes and --slices must be at least 1, --gpus_per_node at least 0")
  if args.tpu_type and args.gpus_per_node:
    raise LaunchError("--tpu_type and --gpus_per_node exclude each other")
  if args.tpu_type:
    tpu = tpu_types.parse(args.tpu_type, args.tpu_topology)
    if args.nodes not in (1, tpu.hosts):
      raise LaunchError(f"--tpu_type={args.tpu_type} has {tpu.hosts} host(s); leave --nodes out")
  if args.slices > 1 and not args.tpu_type:
    raise LaunchError("--slices needs --tpu_type")
  need = {"local": [], "slurm": [], "tpu_vm": ["tpu_type", "zone"], "k8s": ["image"], "skypilot": []}[args.target]
  missing = [f"--{n}" for n in need if not getattr(args, n)]
  if missing:
    raise LaunchError(f"{args.target} needs {' and '.join(missing)}")
  if args.target == "tpu_vm" and args.slices > 1 and not args.queued:
    raise LaunchError("--slices > 1 on TPU VMs needs --queued (a multislice queued resource)")
  if args.target == "k8s" and not (args.tpu_type or args.gpus_per_node):
    raise LaunchError("k8s needs --gpus_per_node or --tpu_type")
  if args.target == "skypilot" and bool(args.gpus_per_node) != bool(args.accelerator):
    raise LaunchError("skypilot takes --gpus_per_node and --accelerator together")
  if args.target in ("local", "slurm", "skypilot") and args.tpu_type:
    raise LaunchError(f"{args.target} does not take --tpu_type (use tpu_vm or k8s)")
  if args.target == "local" and args.nodes != 1:
    raise LaunchError("local runs on this host only: leave --nodes out")
  args.output_dir = args.output_dir or os.path.join(tempfile.gettempdir(), "cce_launch", args.name)
  return args, command


def plan(args, command: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
  """({path: text} to write, [(what, shell command)] to run) for every target but local."""
  out, q = pathlib.Path(args.output_dir), shlex.quote
  if args.target == "slurm":
    path = str(out / f"{args.name}.sbatch")
    return {path: render.slurm_script(args, command)}, [("submit the batch script", f"sbatch {q(path)}")]
  if args.target == "k8s":
    path = str(out / f"{args.name}.yaml")
    return {path: render.jobset(args, command)}, [("create the JobSet", f"kubectl apply -f {q(path)}")]
  if args.target == "skypilot":
    path = str(out / f"{args.name}.sky.yaml")
    return ({path: render.skypilot_task(args, command, str(REPO))},
            [("provision the cluster and run the task", f"sky launch -c {args.name} {q(path)}")])
  script, archive = str(out / f"{args.name}.sh"), str(out / f"{args.name}.tar.gz")
  return ({script: render.tpu_vm_script(args, command)},
          render.tpu_vm_commands(args, archive, script, str(REPO)))


def _print_plan(files, steps, out):
  for path, text in files.items():
    out.write(f"# ---- file {path}\n{text}")
  out.write("# ---- commands\n")
  for what, cmd in steps:
    out.write(f"# {what}\n{cmd}\n")


def _local(args, command, out) -> int:
  n = args.num_processes or args.gpus_per_node or 1
  port = args.port or local_run.free_port()
  envs = [local_run.process_env(dict(os.environ), process_id=i, num_processes=n, port=port,
                                gpus=args.gpus_per_node, cpu_devices=args.cpu_devices,
                                extra=render.env_pairs(args.env)) for i in range(n)]
  if args.dry_run:
    out.write(f"# {n} processes on this host, coordinator localhost:{port}\n")
    out.write(local_run.describe(envs, dict(os.environ), command) + "\n")
    return 0
  out.write(f"launch.py: starting {n} processes, coordinator localhost:{port}\n")
  out.flush()
  status = local_run.run(envs, command)
  out.write(f"launch.py: {n} processes finished, exit status {status}\n")
  return status


def main(argv: list[str], out=sys.stdout) -> int:
  try:
    args, command = parse(argv)
    if args.target == "local":
      return _local(args, command, out)
    files, steps = plan(args, command)
  except (LaunchError, ValueError) as err:  # tpu_types.TpuTypeError and bad --env / --pvc values too
    sys.stderr.write(f"launch.py: error: {err}\n")
    return 2
  if args.dry_run:
    out.write(f"# launch.py {args.target} --dry_run: {len(files)} file(s) and {len(steps)} command(s); nothing "
              "was written or run\n")
    _print_plan(files, steps, out)
    return 0
  for path, text in files.items():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pathlib.Path(path).write_text(text, encoding="utf-8")
    out.write(f"launch.py: wrote {path}\n")
  for what, cmd in steps:
    out.write(f"launch.py: {what}\n$ {cmd}\n")
    out.flush()
    status = subprocess.run(["bash", "-c", cmd], check=False).returncode
    if status:
      sys.stderr.write(f"launch.py: error: exit status {status} from: {what}\n")
      return status
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
