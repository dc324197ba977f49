"""Fills the templates of launch/ (slurm.sbatch, jobset_*.yaml, tpu_vm.sh, skypilot.yaml) from the command line.

Template syntax, kept small so the files stay readable: `{{NAME}}` is replaced by a value; a placeholder alone on
its line takes a block of lines, indented like the placeholder, and the line goes away when the block is empty;
lines between `{{#FLAG}}` and `{{/FLAG}}` are kept only when FLAG is true. Every function here is pure: it returns
text, and launch.py decides whether to write or run it.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex

import tpu_types

HERE = pathlib.Path(__file__).resolve().parent
GPU_COORDINATOR_PORT = 55527  # jax's own default for Kubernetes (jax/_src/clusters/k8s_cluster.py)

_BLOCK = re.compile(r"^([ \t]*)\{\{#(\w+)\}\}\n(.*?)^[ \t]*\{\{/\2\}\}\n", re.M | re.S)
_ALONE = re.compile(r"^([ \t]*)\{\{(\w+)\}\}[ \t]*\n", re.M)
_INLINE = re.compile(r"\{\{(\w+)\}\}")


class RenderError(ValueError):
  """A template that needs a value it was not given (a bug in launch/ or an edited template)."""


def fill(text: str, values: dict, flags: dict | None = None) -> str:
  """`text` with its conditional blocks resolved and every placeholder replaced (see the module docstring)."""
  flags = flags or {}

  def block(match):
    if match.group(2) not in flags:
      raise RenderError(f"the template's block {{{{#{match.group(2)}}}}} has no flag")
    return match.group(3) if flags[match.group(2)] else ""

  def value(name):
    if name not in values:
      raise RenderError(f"the template's field {{{{{name}}}}} has no value")
    return str(values[name])

  def alone(match):
    lines = value(match.group(2)).splitlines()
    return "".join(f"{match.group(1)}{line}\n" if line else "\n" for line in lines)

  text = _BLOCK.sub(block, text)
  text = _ALONE.sub(alone, text)
  return _INLINE.sub(lambda m: value(m.group(1)), text)


def template(name: str) -> str:
  return (HERE / name).read_text(encoding="utf-8")


def env_pairs(entries) -> list[tuple[str, str]]:
  """KEY=VALUE strings (from --env) as pairs; ValueError for one without '=' or with a bad name."""
  pairs = []
  for entry in entries or ():
    key, sep, val = entry.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise ValueError(f"--env={entry!r}: expected NAME=VALUE")
    pairs.append((key, val))
  return pairs


def _exports(pairs) -> str:
  return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in pairs)


# ---------------------------------------------------------------------------------------------------------- SLURM


def slurm_script(args, command: list[str]) -> str:
  """The sbatch script: one task per GPU (or per node with --one_task_per_node), `srun` of the command."""
  gpus = args.gpus_per_node
  tasks = 1 if args.one_task_per_node or not gpus else gpus
  options = [f"--gpus-per-node={gpus}"] if gpus else []
  options += [f"--partition={args.partition}"] if args.partition else []
  options += [f"--account={args.account}"] if args.account else []
  options += list(args.sbatch or ())
  pairs = env_pairs(args.env)
  if gpus and tasks == 1:  # jax would otherwise keep only GPU SLURM_LOCALID = 0 of each node
    pairs.insert(0, ("JAX_LOCAL_DEVICE_IDS", ",".join(str(i) for i in range(gpus))))
  if args.remote_dir:
    options.append(f"--chdir={args.remote_dir}")
  return fill(template("slurm.sbatch"), {
      "NAME": args.name, "NODES": args.nodes, "TASKS_PER_NODE": tasks, "TIME": args.time, "LOG": args.log,
      "SBATCH_OPTIONS": "\n".join(f"#SBATCH {o}" for o in options), "EXPORTS": _exports(pairs),
      "COMMAND": shlex.join(command)})


# ------------------------------------------------------------------------------------------------------ Kubernetes


def _yaml_str(value) -> str:
  return json.dumps(str(value))  # a JSON string is a YAML double-quoted scalar


def _yaml_env(pairs) -> str:
  return "\n".join(f"- name: {k}\n  value: {_yaml_str(v)}" for k, v in pairs)


def _pvc(spec):
  """(claim, mount path) from --pvc=CLAIM:/PATH."""
  claim, sep, path = (spec or "").partition(":")
  if spec and (not sep or not claim or not path.startswith("/")):
    raise ValueError(f"--pvc={spec!r}: expected CLAIM:/MOUNT/PATH")
  return (claim, path) if spec else None


def jobset(args, command: list[str]) -> str:
  """The JobSet YAML: GPU nodes (jobset_gpu.yaml) or TPU slices (jobset_tpu.yaml, with --tpu_type)."""
  pvc = _pvc(args.pvc)
  values = {
      "NAME": args.name, "IMAGE": args.image, "MAX_RESTARTS": args.max_restarts,
      "COMMAND": "\n".join(f"- {_yaml_str(c)}" for c in command),
      "ENV": _yaml_env(env_pairs(args.env)),
      "VOLUME_MOUNTS": f"volumeMounts:\n- name: shared\n  mountPath: {_yaml_str(pvc[1])}" if pvc else "",
      "VOLUMES": f"volumes:\n- name: shared\n  persistentVolumeClaim:\n    claimName: {_yaml_str(pvc[0])}"
                 if pvc else "",
  }
  if args.tpu_type:
    tpu = tpu_types.parse(args.tpu_type, args.tpu_topology)
    if tpu.topology is None:
      raise tpu_types.TpuTypeError(f"--tpu_type={args.tpu_type}: give its GKE topology with --tpu_topology")
    values.update(SLICES=args.slices, HOSTS=tpu.hosts, GKE_ACCELERATOR=tpu.gke_accelerator,
                  TOPOLOGY=tpu.topology, CHIPS_PER_HOST=tpu.chips_per_host)
    return fill(template("jobset_tpu.yaml"), values, {"MULTISLICE": args.slices > 1})
  values.update(NODES=args.nodes, GPUS_PER_NODE=args.gpus_per_node, PORT=args.port or GPU_COORDINATOR_PORT)
  return fill(template("jobset_gpu.yaml"), values)


# ---------------------------------------------------------------------------------------------------- TPU VMs

# TPU VM (and cloud VM) images ship an older Python than the package needs (3.12): uv brings its own.
DEFAULT_TPU_SETUP = "\n".join([
    'export PATH="$HOME/.local/bin:$PATH"',
    "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
    "uv venv --allow-existing --python 3.12 .venv",
    'uv pip install --python .venv/bin/python -e . "jax[tpu]"'])


def tpu_vm_script(args, command: list[str]) -> str:
  """The script every TPU VM worker runs: unpack the code, set up once, run the command."""
  return fill(template("tpu_vm.sh"), {
      "NAME": args.name, "REMOTE_DIR": args.remote_dir or "cce_jax", "SETUP": args.setup or DEFAULT_TPU_SETUP,
      "EXPORTS": _exports(env_pairs(args.env)), "COMMAND": shlex.join(command)})


def _where(args) -> str:
  return f"--zone={args.zone}" + (f" --project={args.project}" if args.project else "")


def tpu_nodes(args) -> list[str]:
  """The TPU VM names: one, or NAME-0 ... NAME-(K-1) for a queued resource of K slices (its node prefix)."""
  return [args.name] if args.slices == 1 else [f"{args.name}-{i}" for i in range(args.slices)]


def tpu_vm_commands(args, archive: str, script: str, repo: str) -> list[tuple[str, str]]:
  """(what, shell command) steps: pack the code, create or reuse the TPU VM(s), copy, run on --worker=all."""
  tpu = tpu_types.parse(args.tpu_type)
  where, name, q = _where(args), args.name, shlex.quote
  version = args.tpu_version or tpu.runtime_version
  spot = " --spot" if args.spot else ""
  steps = [("pack the code (files git tracks, and untracked ones it does not ignore)",
            f"git -C {q(repo)} ls-files -z --cached --others --exclude-standard | "
            f"tar -czf {q(archive)} --ignore-failed-read --null -C {q(repo)} -T -")]
  if args.queued:
    nodes = (f"--node-id={name}" if args.slices == 1 else f"--node-count={args.slices} --node-prefix={name}")
    steps.append((f"request the queued resource {name} unless it exists",
                  f"gcloud compute tpus queued-resources describe {name} {where} >/dev/null 2>&1 || "
                  f"gcloud compute tpus queued-resources create {name} {where} --accelerator-type={tpu.name} "
                  f"--runtime-version={version} {nodes}{spot}"))
    steps.append((f"wait until {name} is ACTIVE",
                  f"while :; do s=$(gcloud compute tpus queued-resources describe {name} {where} "
                  f"--format='value(state.state)'); echo \"{name}: $s\"; [ \"$s\" = ACTIVE ] && break; "
                  f"case \"$s\" in FAILED|SUSPENDED) exit 1;; esac; sleep 30; done"))
  else:
    steps.append((f"create the TPU VM {name} unless it exists",
                  f"gcloud compute tpus tpu-vm describe {name} {where} >/dev/null 2>&1 || "
                  f"gcloud compute tpus tpu-vm create {name} {where} --accelerator-type={tpu.name} "
                  f"--version={version}{spot}"))
  for node in tpu_nodes(args):
    steps.append((f"copy the code and the script to every worker of {node}",
                  f"gcloud compute tpus tpu-vm scp {q(archive)} {q(script)} {node}: --worker=all {where}"))
  ssh = [f"gcloud compute tpus tpu-vm ssh {node} --worker=all {where} "
         f"--command={q(f'bash ~/{name}.sh')}" for node in tpu_nodes(args)]
  if len(ssh) == 1:
    steps.append(("run the command on every worker at once", ssh[0]))
  else:  # every slice must start: one ssh per slice, in parallel, and fail if any fails
    steps.append(("run the command on every worker of every slice at once",
                  " &\n".join(ssh) + " &\nstatus=0; for p in $(jobs -p); do wait \"$p\" || status=1; done; "
                  "exit $status"))
  return steps


# ------------------------------------------------------------------------------------------------------- SkyPilot


def skypilot_task(args, command: list[str], repo: str) -> str:
  """The SkyPilot task YAML (skypilot.yaml): --nodes GPU VMs, the repository synced, one process per node."""
  resources = []
  if args.gpus_per_node:
    resources.append(f"accelerators: {_yaml_str(f'{args.accelerator}:{args.gpus_per_node}')}")
  if args.cloud:
    resources.append(f"cloud: {_yaml_str(args.cloud)}")
  env = "\n".join(f"{k}: {_yaml_str(v)}" for k, v in env_pairs(args.env))
  setup = args.setup or DEFAULT_TPU_SETUP.replace('"jax[tpu]"', '"jax[cuda12]"' if args.gpus_per_node else "jax")
  return fill(template("skypilot.yaml"), {
      "NAME": args.name, "NODES": args.nodes, "RESOURCES": "\n".join(resources), "WORKDIR": _yaml_str(repo),
      "ENV": env, "SETUP": setup, "PORT": args.port or GPU_COORDINATOR_PORT, "COMMAND": shlex.join(command)},
              {"RESOURCES": bool(resources)})
