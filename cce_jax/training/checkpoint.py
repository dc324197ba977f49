"""Orbax checkpoints of a training run: train state, data-iterator state and run metadata, saved asynchronously.

Layout: {workdir}/checkpoints/{step}/{state,data,meta}. Orbax writes each step into a temporary folder and renames
it when complete, so a run killed mid-save leaves no half step in `all_steps()`; a step that exists but cannot be
read (files damaged or removed) is skipped with a warning and the next older one is restored.
"""

from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for {"state": pytree, "data": dict, "meta": dict}."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
                             force=force)

  def restore_latest(self, abstract_state):
    """(step, state, data_state, meta) of the newest readable checkpoint, or None if there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return step, out["state"], out["data"], out["meta"]
      except Exception as err:  # pylint: disable=broad-except
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying an older one", step,
                        self.directory, type(err).__name__, str(err)[:200])
    return None

  def latest_step(self):
    return self.manager.latest_step()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
