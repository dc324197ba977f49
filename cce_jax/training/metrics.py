"""Run metrics: one JSON line per record in {workdir}/metrics/metrics.jsonl, optional TensorBoard, a loss plot."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np


class MetricsWriter:
  """Appends records {"step", ...} to metrics.jsonl (a resumed run drops records past its restored step).

  enabled=False (every process but the first of a multi-process run) makes it a no-op, so that one file has one
  writer."""

  def __init__(self, workdir: str, *, resume_step: int | None = None, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self.folder = os.path.join(workdir, "metrics")
    os.makedirs(self.folder, exist_ok=True)
    self.path = os.path.join(self.folder, "metrics.jsonl")
    if os.path.exists(self.path):
      self._truncate_after(resume_step if resume_step is not None else 0)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int):
    """Keeps the records of steps <= step: the steps after the restored checkpoint are trained again."""
    with open(self.path, encoding="utf-8") as f:
      kept = [line for line in f if line.strip() and _record_step(line) <= step]
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(kept)

  def write(self, record: dict):
    if not self.enabled:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.scalar(key, value, record["step"])

  def close(self):
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _record_step(line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return 1 << 62  # a torn last line (killed mid-write) is dropped


class _TensorBoard:
  """Scalar summaries through the `tensorboard` package alone (no TensorFlow)."""

  def __init__(self, folder):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=import-outside-toplevel
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=import-outside-toplevel
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._writer = EventFileWriter(folder)

  def scalar(self, tag, value, step):
    summary = self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
    self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def close(self):
    self._writer.close()


def _tensorboard_writer(folder):
  try:
    return _TensorBoard(folder)
  except ImportError:
    return None


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics", "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def record_at(workdir: str, step: int) -> dict:
  """The metrics record of `step` (the final one of a finished run), {} when metrics.jsonl has none."""
  path = os.path.join(workdir, "metrics", "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip() and _record_step(line) == step]
  return json.loads(lines[-1]) if lines else {}


def plot_losses(workdir: str) -> str | None:
  """Writes {workdir}/plots/loss.png (train and validation loss against step); None without matplotlib."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.info("matplotlib is not installed: no loss plot")
    return None
  records = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train", lw=1)
  if val:
    ax.plot(*zip(*val), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.legend()
  ax.grid(alpha=0.3)
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  path = os.path.join(workdir, "plots", "loss.png")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def load_runs(items) -> dict:
  """{label: metrics records} from LABEL=WORKDIR strings; ValueError for a malformed item or a run without
  metrics."""
  runs = {}
  for item in items:
    label, sep, workdir = item.partition("=")
    if not sep or not label or not workdir:
      raise ValueError(f"runs are LABEL=WORKDIR pairs, got {item!r}")
    path = os.path.join(workdir, "metrics", "metrics.jsonl")
    records = read_metrics(workdir) if os.path.exists(path) else []
    if not records:
      raise ValueError(f"no metrics in {workdir!r} (expected {workdir}/metrics/metrics.jsonl)")
    runs[label] = records
  return runs


def comparison_table(runs: dict, tail: int = 20) -> str:
  """Markdown: validation loss at every evaluated step, mean training loss of the last `tail` steps, median
  tokens/s (the first step, which compiles, left out)."""
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


def plot_comparison(runs: dict, path: str, smooth: int = 20) -> str:
  """PNG of every run's training loss (moving average over `smooth` steps) and validation points."""
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
