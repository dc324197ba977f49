r"""Compares training runs: a table of validation losses and throughput, and one plot of their loss curves.

  python experiments/compare_runs.py --runs=naive=runs/naive,full=runs/full --out=runs/compare.png

Each run is LABEL=WORKDIR (a directory written by experiments/train.py). The table gives the validation loss at
every evaluated step, the mean training loss over the last --tail steps and the median tokens/s; the plot shows
the training loss (moving average over --smooth steps) and the validation points of every run.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np

from cce_jax.training import metrics

_RUNS = flags.DEFINE_list("runs", None, "LABEL=WORKDIR pairs.")
_OUT = flags.DEFINE_string("out", None, "PNG path for the plot (needs matplotlib).")
_SMOOTH = flags.DEFINE_integer("smooth", 20, "Moving-average window of the training loss in the plot.")
_TAIL = flags.DEFINE_integer("tail", 20, "Training steps averaged for the table's final training loss.")
flags.mark_flag_as_required("runs")


def parse_runs(items):
  runs = {}
  for item in items:
    label, sep, workdir = item.partition("=")
    if not sep or not label or not workdir:
      raise app.UsageError(f"--runs takes LABEL=WORKDIR pairs, got {item!r}")
    path = os.path.join(workdir, "metrics", "metrics.jsonl")
    records = metrics.read_metrics(workdir) if os.path.exists(path) else []
    if not records:
      raise app.UsageError(f"no metrics in {workdir!r} (expected {workdir}/metrics/metrics.jsonl)")
    runs[label] = records
  return runs


def table(runs, tail):
  steps = sorted({r["step"] for recs in runs.values() for r in recs if "val_loss" in r})
  lines = ["| run | " + " | ".join(f"val @ {s}" for s in steps) + f" | train (last {tail}) | tokens/s |",
           "|---|" + "---|" * (len(steps) + 2)]
  for label, recs in runs.items():
    val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    train = [r["loss"] for r in recs if "loss" in r][-tail:]
    speed = np.median([r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:] or [np.nan])
    cells = [f"{val[s]:.4f}" if s in val else "-" for s in steps]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {np.mean(train):.4f} | {speed:,.0f} |")
  return "\n".join(lines)


def plot(runs, path, smooth):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for k, (label, recs) in enumerate(runs.items()):
    color = f"C{k}"
    steps = np.array([r["step"] for r in recs if "loss" in r])
    loss = np.array([r["loss"] for r in recs if "loss" in r])
    if len(loss) >= smooth > 1:
      loss = np.convolve(loss, np.ones(smooth) / smooth, mode="valid")
      steps = steps[smooth - 1:]
    ax.plot(steps, loss, color=color, lw=1, label=f"{label} train")
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if val:
      ax.plot(*zip(*val), "o--", color=color, ms=4, label=f"{label} val")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def main(argv):
  del argv
  runs = parse_runs(_RUNS.value)
  print(table(runs, _TAIL.value))
  if _OUT.value:
    print("plot:", plot(runs, _OUT.value, _SMOOTH.value))


if __name__ == "__main__":
  app.run(main)
