"""Orbax checkpoints of a training run: train state, data-iterator state and run metadata, saved asynchronously.

Layout: {workdir}/checkpoints/{step}/{state,data,meta}. Orbax writes each step into a temporary folder and renames
it when complete (on gs://, writes a commit file last), so a run killed mid-save leaves no half step in
`all_steps()`; a step that exists but cannot be read (files damaged or removed) is moved to
{workdir}/unreadable_checkpoints/{step} (kept, never deleted) with a warning, and the next older one is restored;
training then re-saves those steps.

workdir is a path (a shared file system when several hosts train one run) or a gs:// URL, reached through
etils.epath (gcsfs or TensorFlow's gfile) and tensorstore's GCS driver; `check_storage` says in one line why a URL
cannot work. A URL run keeps its small files (tokenizer, metrics, plots) in a local folder and copies them to and
from the URL (`pull`, `push`), as object stores do not append.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile

import orbax.checkpoint as ocp
from etils import epath

# The run's small files, copied between a URL workdir and its local folder (TensorBoard events stay local). The
# tokenizer's record comes first, as data.tokenizer saves them: a tokenizer without its record reads as an old one.
TOKENIZER = ("tokenizer.trained_on.json", "tokenizer.json")
METRICS = ("metrics/metrics.jsonl",)
PLOT = ("plots/loss.png",)


def is_url(path: str) -> bool:
  return "://" in path


def check_storage(workdir: str) -> str | None:
  """None when checkpoints can go to workdir, else one line saying why not and what to do instead."""
  if not is_url(workdir):
    return None
  scheme = workdir.split("://", 1)[0]
  if scheme != "gs":
    return (f"--workdir={workdir}: checkpoints go to a path (a shared file system for several hosts) or a gs:// URL; "
            f"Orbax {ocp.__version__} writes arrays to no other URL scheme (mount the bucket, e.g. with "
            "mountpoint-s3 or s3fs-fuse, and give its path)")
  missing = [name for name, module in (("gcsfs", "gcsfs"), ("google-cloud-storage", "google.cloud.storage"))
             if not _importable(module)]
  if "gcsfs" in missing and (_importable("tensorflow") or _fsspec_knows("gcs")):
    missing.remove("gcsfs")  # epath reaches gs:// through TensorFlow's gfile, or a registered fsspec filesystem
  if missing:
    return (f"--workdir={workdir}: gs:// needs {' and '.join(missing)} (pip install 'cce_jax[gcs]', or give a path "
            "such as a bucket mounted with gcsfuse)")
  return None


def _importable(module: str) -> bool:
  if module in sys.modules:
    return True
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a missing parent package
    return False


def _fsspec_knows(protocol: str) -> bool:
  import fsspec  # pylint: disable=import-outside-toplevel
  return protocol in fsspec.registry


def local_folder(workdir: str) -> str:
  """Where the run's small files live: workdir itself, or for a URL {tmp}/cce_jax_runs/{scheme}/{bucket}/{path}."""
  if not is_url(workdir):
    return workdir
  scheme, rest = workdir.split("://", 1)
  return os.path.join(tempfile.gettempdir(), "cce_jax_runs", scheme, rest.strip("/"))


def pull(workdir: str, folder: str, names=TOKENIZER + METRICS):
  """Copies the files `names` that the URL workdir has into the local folder, replacing local copies: the URL is
  the run's record (the run may have gone on from another machine)."""
  for name in names:
    source, target = epath.Path(workdir) / name, os.path.join(folder, name)
    if source.exists():
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, "wb") as f:
        f.write(source.read_bytes())


def push(folder: str, workdir: str, names=TOKENIZER + METRICS + PLOT):
  """Copies the files `names` that the local folder has to the URL workdir, replacing the URL's copies."""
  for name in names:
    source = os.path.join(folder, name)
    if os.path.exists(source):
      with open(source, "rb") as f:
        (epath.Path(workdir) / name).write_bytes(f.read())


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for {"state": pytree, "data": dict, "meta": dict}."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    root = (workdir if is_url(workdir) else os.path.abspath(workdir)).rstrip("/")
    self.directory = f"{root}/checkpoints"
    self.quarantine = f"{root}/unreadable_checkpoints"
    self.every = every
    # The save policy is ours (every `every` steps and the last one); Orbax would also save the first step.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    """Saves (asynchronously) if step is a multiple of `every` or force; returns whether it did."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
                             force=True)

  def restore_latest(self, abstract_state):
    """(step, state, data_state, meta) of the newest readable checkpoint, or None if there is none."""
    result, unreadable = None, []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        result = step, out["state"], out["data"], out["meta"]
        break
      except Exception as err:  # pylint: disable=broad-except
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); moving it to %s and trying an older "
                        "one", step, self.directory, type(err).__name__, str(err)[:200], self.quarantine)
        unreadable.append(step)
    for step in unreadable:  # out of the way of the steps that will be saved again
      quarantine = epath.Path(self.quarantine)
      quarantine.mkdir(parents=True, exist_ok=True)
      target = quarantine / str(step)
      suffix = 0
      while target.exists():
        suffix += 1
        target = quarantine / f"{step}.{suffix}"
      (epath.Path(self.directory) / str(step)).rename(target)
    if unreadable:
      self.manager.reload()
    return result

  def latest_meta(self) -> dict:
    """The run metadata (config, parameter counts) of the newest checkpoint."""
    step = self.manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """The saved steps, readable or not."""
    return sorted(self.manager.all_steps())

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
