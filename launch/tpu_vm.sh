#!/bin/bash
# Runs on every worker of a Cloud TPU VM slice (`gcloud compute tpus tpu-vm ssh --worker=all`); `launch.py tpu_vm`
# fills in the {{...}} fields, copies this script and the code to each worker and starts it on all of them at once.
# `jax.distributed.initialize()` needs no arguments here: the TPU metadata server gives every worker its number
# (agent-worker-number), the workers' addresses (worker-network-endpoints; the first is the coordinator, port
# 8482) and, on multislice queued resources, MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID /
# MEGASCALE_COORDINATOR_ADDRESS (jax/_src/clusters/cloud_tpu_cluster.py).
set -euo pipefail

mkdir -p {{REMOTE_DIR}}
tar -xzf ~/{{NAME}}.tar.gz -C {{REMOTE_DIR}}
cd {{REMOTE_DIR}}

# Set up .venv once per worker (until the setup has succeeded); later runs reuse it.
if [ ! -f .setup_done ]; then
  {{SETUP}}
  touch .setup_done
fi
source .venv/bin/activate
{{EXPORTS}}

{{COMMAND}} 2>&1 | tee -a ~/{{NAME}}.log
