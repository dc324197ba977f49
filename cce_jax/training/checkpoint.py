"""Orbax checkpoints of a training run: train state, data-iterator state and run metadata, saved asynchronously.

Layout: {workdir}/checkpoints/{step}/{state,data,meta}. Orbax writes each step into a temporary folder and renames
it when complete, so a run killed mid-save leaves no half step in `all_steps()`; a step that exists but cannot be
read (files damaged or removed) is moved to {workdir}/unreadable_checkpoints/{step} (kept, never deleted) with a
warning, and the next older one is restored; training then re-saves those steps.
"""

from __future__ import annotations

import logging
import os
import shutil

import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for {"state": pytree, "data": dict, "meta": dict}."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.quarantine = os.path.join(os.path.abspath(workdir), "unreadable_checkpoints")
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
      os.makedirs(self.quarantine, exist_ok=True)
      target = os.path.join(self.quarantine, str(step))
      suffix = 0
      while os.path.exists(target):
        suffix += 1
        target = os.path.join(self.quarantine, f"{step}.{suffix}")
      shutil.move(os.path.join(self.directory, str(step)), target)
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
