"""What decides each process's id, the process count, the coordinator and the devices, with the environment mocked:
launch/'s local target (local_run.process_env), and jax's own cluster auto-detection fed the variables that SLURM,
GKE and the rendered JobSets give, so that the templates' assumptions are checked against the installed jax."""

from __future__ import annotations

import io

import pytest
import yaml
from jax._src import clusters
from jax._src import distributed as jax_distributed
from jax._src.clusters import cloud_tpu_cluster
from jax._src.clusters import cluster as cluster_lib

import launch
import local_run

_CLUSTER_VARIABLES = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "TPU_", "MEGASCALE_", "JAX_")


@pytest.fixture
def bare_env(monkeypatch):
  """os.environ without any cluster's variables; returns monkeypatch to set some."""
  import os  # pylint: disable=import-outside-toplevel
  for key in list(os.environ):
    if key.startswith(_CLUSTER_VARIABLES):
      monkeypatch.delenv(key)
  return monkeypatch


def _detect(local_device_ids=None):
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, local_device_ids, None, 5)


def _slurm(monkeypatch, *, job_id, nodelist, ntasks, procid, localid):
  for key, value in dict(SLURM_JOB_ID=job_id, SLURM_STEP_NODELIST=nodelist, SLURM_NTASKS=ntasks,
                         SLURM_PROCID=procid, SLURM_LOCALID=localid).items():
    monkeypatch.setenv(key, str(value))


def test_slurm_first_node_coordinates_and_each_task_keeps_gpu_localid(bare_env):
  _slurm(bare_env, job_id=123457, nodelist="gpu[007-008,011],login1", ntasks=16, procid=13, localid=5)
  coordinator, count, pid, devices = _detect()
  assert coordinator == f"gpu007:{61440 + 123457 % 4096}"  # the sbatch template's comment says this
  assert (count, pid, devices) == (16, 13, [5])
  bare_env.setenv("JAX_COORDINATOR_PORT", "12345")
  assert _detect()[0] == "gpu007:12345"


def test_slurm_one_task_per_node_keeps_every_gpu_given_explicitly(bare_env):
  _slurm(bare_env, job_id=9, nodelist="node1,node2", ntasks=2, procid=1, localid=0)
  assert _detect()[3] == [0]  # what jax does alone: only GPU 0 of each node
  # With JAX_LOCAL_DEVICE_IDS (set by the one-task-per-node sbatch script), jax.distributed.initialize passes the
  # ids in before auto-detection, which leaves them alone.
  assert "JAX_LOCAL_DEVICE_IDS" in jax_distributed.State.initialize.__code__.co_consts
  assert _detect(local_device_ids=[0, 1, 2, 3])[3] == [0, 1, 2, 3]


def _resolve(env_entries, annotations):
  """The variables a container gets from the JobSet's env list, with the downward-API annotations given."""
  env = {}
  for entry in env_entries:
    if "value" in entry:
      env[entry["name"]] = entry["value"]
    else:
      path = entry["valueFrom"]["fieldRef"]["fieldPath"]
      env[entry["name"]] = annotations[path.split("'")[1]]
  return env


def _rendered_jobset(argv):
  out = io.StringIO()
  assert launch.main(argv + ["--dry_run", "--output_dir=/o", "--", "python", "train.py", "--distributed"],
                     out=out) == 0
  return yaml.safe_load(out.getvalue().split("# ---- file /o/cce-train.yaml\n")[1].split("# ---- commands")[0])


def test_gke_tpu_multislice_ids_and_coordinator_from_the_rendered_jobset(bare_env):
  doc = _rendered_jobset(["k8s", "--tpu_type=v5litepod-16", "--slices=2", "--image=i"])
  container = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
  bare_env.setattr(cluster_lib, "running_in_cloud_tpu_vm", True)
  bare_env.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  bare_env.setattr(cloud_tpu_cluster.BaseTpuCluster, "wait_for_coordinator", classmethod(lambda *a: None))
  seen = set()
  for slice_id in range(2):
    for worker in range(4):
      env = _resolve(container["env"], {"jobset.sigs.k8s.io/job-index": str(slice_id)})
      # What GKE sets in each TPU pod of the slice (TPU_SKIP_MDS_QUERY keeps jax off the GCE metadata server).
      env.update(TPU_WORKER_ID=str(worker), TPU_WORKER_HOSTNAMES=",".join(f"h{slice_id}-{i}" for i in range(4)),
                 TPU_SKIP_MDS_QUERY="true")
      for key, value in env.items():
        bare_env.setenv(key, value)
      coordinator, count, pid, devices = _detect()
      assert coordinator == "cce-train-slice-0-0.cce-train:8482" and count == 8 and devices is None
      seen.add(pid)
  assert seen == set(range(8))


def test_kubernetes_gpu_jobset_gives_every_pod_its_id_and_pod_0_as_coordinator():
  doc = _rendered_jobset(["k8s", "--nodes=3", "--gpus_per_node=8", "--image=i"])
  rjob = doc["spec"]["replicatedJobs"][0]
  container = rjob["template"]["spec"]["template"]["spec"]["containers"][0]
  envs = [_resolve(container["env"], {"batch.kubernetes.io/job-completion-index": str(i)}) for i in range(3)]
  assert sorted(int(e["JAX_PROCESS_ID"]) for e in envs) == [0, 1, 2]
  assert {e["JAX_NUM_PROCESSES"] for e in envs} == {"3"}
  # Indexed Job pods are named <job>-<completion index>, the job <jobset>-<replicated job>-<job index>.
  assert {e["JAX_COORDINATOR_ADDRESS"] for e in envs} == {f"cce-train-{rjob['name']}-0-0.cce-train:55527"}


def test_local_processes_get_ids_devices_and_no_cluster_variables():
  base = {"PATH": "/bin", "SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "OMPI_COMM_WORLD_RANK": "1",
          "XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"}
  envs = [local_run.process_env(base, process_id=i, num_processes=4, port=4321, gpus=8) for i in range(4)]
  assert [e["JAX_PROCESS_ID"] for e in envs] == ["0", "1", "2", "3"]
  assert {e["JAX_NUM_PROCESSES"] for e in envs} == {"4"}
  assert {e["JAX_COORDINATOR_ADDRESS"] for e in envs} == {"localhost:4321"}
  assert [e["JAX_LOCAL_DEVICE_IDS"] for e in envs] == ["0,1", "2,3", "4,5", "6,7"]
  assert not any(k.startswith(("SLURM_", "OMPI_")) for e in envs for k in e)
  cpu = local_run.process_env(base, process_id=1, num_processes=2, port=1, cpu_devices=2, extra=[("A", "b")])
  assert cpu["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2"
  assert (cpu["JAX_PLATFORMS"], cpu["A"]) == ("cpu", "b") and "JAX_LOCAL_DEVICE_IDS" not in cpu
  with pytest.raises(ValueError, match="multiple"):
    local_run.process_env(base, process_id=0, num_processes=3, port=1, gpus=8)
  with pytest.raises(ValueError, match="process_id"):
    local_run.process_env(base, process_id=2, num_processes=2, port=1)


def test_local_dry_run_prints_each_process_environment(monkeypatch):
  monkeypatch.setattr("os.environ", {"PATH": "/bin", "SLURM_JOB_ID": "7"})
  out = io.StringIO()
  assert launch.main(["local", "--num_processes=2", "--cpu_devices=1", "--port=23456", "--dry_run", "--",
                      "python", "experiments/train.py", "--distributed"], out=out) == 0
  assert out.getvalue() == (
      "# 2 processes on this host, coordinator localhost:23456\n"
      "env -u SLURM_JOB_ID JAX_COORDINATOR_ADDRESS=localhost:23456 JAX_NUM_PROCESSES=2 JAX_PLATFORMS=cpu "
      "JAX_PROCESS_ID=0 XLA_FLAGS=--xla_force_host_platform_device_count=1 python experiments/train.py "
      "--distributed &\n"
      "env -u SLURM_JOB_ID JAX_COORDINATOR_ADDRESS=localhost:23456 JAX_NUM_PROCESSES=2 JAX_PLATFORMS=cpu "
      "JAX_PROCESS_ID=1 XLA_FLAGS=--xla_force_host_platform_device_count=1 python experiments/train.py "
      "--distributed &\n"
      "wait\n")
