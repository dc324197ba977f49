r"""Compares training runs: a table of validation losses and throughput, and one plot of their loss curves.

  python experiments/compare_runs.py --runs=naive=runs/naive,full=runs/full --out=runs/compare.png

Each run is LABEL=WORKDIR (a directory written by experiments/train.py). The table gives the validation loss at
every evaluated step, the mean training loss over the last --tail steps and the median tokens/s; the plot shows
the training loss (moving average over --smooth steps) and the validation points of every run.
"""

from __future__ import annotations

from absl import app
from absl import flags

from cce_jax.training import metrics

_RUNS = flags.DEFINE_list("runs", None, "LABEL=WORKDIR pairs.")
_OUT = flags.DEFINE_string("out", None, "PNG path for the plot (needs matplotlib).")
_SMOOTH = flags.DEFINE_integer("smooth", 20, "Moving-average window of the training loss in the plot.")
_TAIL = flags.DEFINE_integer("tail", 20, "Training steps averaged for the table's final training loss.")
flags.mark_flag_as_required("runs")


def main(argv):
  del argv
  try:
    runs = metrics.load_runs(_RUNS.value)
  except ValueError as err:
    raise app.UsageError(str(err)) from err
  print(metrics.comparison_table(runs, _TAIL.value))
  if _OUT.value:
    print("plot:", metrics.plot_comparison(runs, _OUT.value, _SMOOTH.value))


if __name__ == "__main__":
  app.run(main)
