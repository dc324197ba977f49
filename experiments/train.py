r"""Trains a decoder LM with the fused loss; resumes from --workdir automatically.

  python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/cce_tiny
  python experiments/train.py --config=experiments/configs/tiny.py --config.steps=50 --config.loss=naive ...

Writes {workdir}/checkpoints (Orbax, async, keep-N, with the data-iterator state), {workdir}/metrics/metrics.jsonl
(+ TensorBoard events when the `tensorboard` package is installed), {workdir}/plots/loss.png and the run's
tokenizer. Each preset's docstring gives its hardware, time and expected loss. Every config field (name, default,
meaning), the run directory, resuming and these flags: docs/training.md. A bad config, an unknown field, a
workdir that is a file or holds a tokenizer trained on other data end the run before it starts, with one line.

Several processes (hosts) train one run through JAX's multi-controller runtime: start the same command in every
process with --distributed (cluster environments such as SLURM, TPU VMs or Kubernetes with a coordinator are
detected by `jax.distributed.initialize`) or with --coordinator_address=HOST:PORT --num_processes=P
--process_id=I. The mesh then spans every process's devices, each process feeds its rows of the global batch, and
process 0 writes the metrics; --workdir must be the same shared directory, or the same gs:// URL (checkpoints there,
the tokenizer, metrics and plot copied there from a local folder; other URL schemes end the run with one line), for
all. With --distributed, JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment give the process count and id where
no cluster provides them (launch/launch.py sets them: its local target, Kubernetes); docs/launch.md.
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import jax

from cce_jax import data as data_lib
from cce_jax.training import checkpoint as checkpoint_lib
from cce_jax.training import trainer
from cce_jax.training import validate as validate_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file from experiments/configs/; override its fields with --config.NAME=VALUE "
    "(every field: docs/training.md).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds checkpoints).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Initialise JAX's multi-process runtime (cluster "
                                  "auto-detection unless --coordinator_address is given).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _fail(message):
  """One line on stderr and exit status 2, as a usage error (no traceback, no page of help)."""
  sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {message}\n")
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing, with one line for an unknown --config.NAME (and the closest names), a bad value, or a
  config file that does not load."""
  names = []
  for arg in argv[1:]:
    if arg == "--":
      break
    if match := _OVERRIDE.match(arg):
      names.append(match.group(1))
  try:
    validate_lib.check_override_names(names)
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # a config file that failed to load raises here, not while parsing
  except validate_lib.ConfigError as err:
    _fail(err)
  except flags.Error as err:
    _fail(str(err).replace("\n", " "))
  except (OSError, AttributeError, KeyError, TypeError, ValueError, SyntaxError) as err:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    _fail(f"--config: {lines[-1] if lines else type(err).__name__}")
  return rest


def _configure_logging():
  """INFO unless --verbosity says otherwise; JAX's backend probes ("Unable to initialize backend 'tpu'") and
  Orbax's save phases only with --verbosity=1."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  if logging.get_verbosity() < logging.DEBUG:
    py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)
    logging.get_absl_handler().addFilter(_QuietOrbax())


class _QuietOrbax(py_logging.Filter):
  """Orbax logs every save phase at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def _environment_int(name):
  value = os.environ.get(name)
  if value is None:
    return None
  if not value.strip().isdigit():
    _fail(f"the environment variable {name}={value!r} is not a non-negative integer")
  return int(value)


def _initialize_distributed():
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not _DISTRIBUTED.value and all(v is None for v in explicit):
    return
  if any(v is None for v in explicit) and any(v is not None for v in explicit):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
  # CPU processes need a collectives library for cross-process reductions (GPUs and TPUs bring their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit[0] is None:
    # Cluster auto-detection fills in what is None. launch/'s local target and Kubernetes JobSet set the count and
    # the id in the environment (jax itself reads only JAX_COORDINATOR_ADDRESS there).
    jax.distributed.initialize(num_processes=_environment_int("JAX_NUM_PROCESSES"),
                               process_id=_environment_int("JAX_PROCESS_ID"))
  else:
    jax.distributed.initialize(coordinator_address=explicit[0], num_processes=explicit[1], process_id=explicit[2])


def main(argv):
  del argv
  _configure_logging()
  if problem := checkpoint_lib.check_storage(_WORKDIR.value):
    _fail(problem)
  try:
    validate_lib.validate(_CONFIG.value)
    _initialize_distributed()
    record = trainer.train(_CONFIG.value, _WORKDIR.value)
  except (validate_lib.ConfigError, data_lib.DataError) as err:
    _fail(err)
  print(f"final: {record}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
