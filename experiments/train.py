r"""Trains a decoder LM with the fused loss; resumes from --workdir automatically.

  python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/cce_tiny
  python experiments/train.py --config=experiments/configs/tiny.py --config.steps=50 --config.loss=naive ...

Writes {workdir}/checkpoints (Orbax, async, keep-N, with the data-iterator state), {workdir}/metrics/metrics.jsonl
(+ TensorBoard events when the `tensorboard` package is installed), {workdir}/plots/loss.png and the run's
tokenizer. Each preset's docstring gives its hardware, time and expected loss.
"""

from __future__ import annotations

import logging as py_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cce_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file from experiments/configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(py_logging.Filter):
  """Orbax logs every save phase at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietOrbax())
  record = trainer.train(_CONFIG.value, _WORKDIR.value)
  print(f"final: {record}", flush=True)


if __name__ == "__main__":
  app.run(main)
