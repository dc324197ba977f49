"""The LM training loop behind experiments/train.py: data, model, sharding, optimizer, checkpoints, metrics.

The steps and the sharding live in `step.py`; the same code runs on one CPU, simulated CPU devices or N GPUs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding

from cce_jax import data as data_lib
from cce_jax import models
from cce_jax.training import checkpoint as checkpoint_lib
from cce_jax.training import config as config_lib
from cce_jax.training import metrics as metrics_lib
from cce_jax.training import optim
from cce_jax.training import step as step_lib
from cce_jax.training.params import ParamCodec
from cce_jax.training.validate import ConfigError
from cce_jax.training.validate import validate


def _batch_to_devices(batch, sharding):
  """The global batch as arrays split over the mesh; each process contributes its own rows."""
  nproc, pid = jax.process_count(), jax.process_index()
  out = {}
  for k, v in batch.items():
    rows = v.shape[0] // nproc
    out[k] = jax.make_array_from_process_local_data(sharding, v[pid * rows:(pid + 1) * rows], v.shape)
  return out


@dataclasses.dataclass
class Run:
  """What `setup` builds for `train` and `hidden_states.dump`; tests use its pieces."""

  cfg: object
  model_cfg: models.Config
  codec: ParamCodec
  init_state: object
  train_step: object
  eval_step: object
  state: dict  # abstract after `setup`; arrays once `train` restores or initialises it
  batches: data_lib.Batches
  val_tokens: np.ndarray
  batch_sharding: NamedSharding


def setup(cfg, workdir: str) -> Run:
  """The run's data (its own tokenizer in workdir: data.prepare checks it was trained on cfg.data) and its steps,
  with the state abstract (`train` restores into it, or initialises only when there is nothing to restore).

  Shared by `train` and `hidden_states.dump`."""
  corpus = data_lib.prepare(cfg.data, cfg.vocab_size, cfg.data_cache, val_fraction=cfg.val_fraction,
                            max_bytes=cfg.max_bytes or None, tokenizer_path=os.path.join(workdir, "tokenizer.json"))
  batches = data_lib.Batches(corpus.train, cfg.seq_len, cfg.batch_size, cfg.seed)
  mcfg = config_lib.model_config(cfg)
  steps = step_lib.build(mcfg, optim.OptimConfig.from_config(cfg), loss=cfg.loss, loss_gradient=cfg.loss_gradient,
                         fsdp=cfg.fsdp, seed=cfg.seed, init=False)
  return Run(cfg, mcfg, steps.codec, steps.init_state, steps.train_step, steps.eval_step, steps.state, batches,
             corpus.val, steps.batch_sharding)


def _make_run_directory(cfg, workdir: str):
  """Creates workdir; ConfigError when it is a file or cannot be created, or the batch does not split evenly."""
  if cfg.batch_size % jax.device_count():
    raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the device count {jax.device_count()}")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir!r} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as err:
    raise ConfigError(f"cannot create workdir {workdir!r}: {err.strerror or err}") from err


def _warn_without_validation(run: Run):
  needed = run.cfg.batch_size * run.cfg.seq_len + 1
  if run.cfg.eval_every and len(run.val_tokens) < needed:
    logging.warning("the validation split has %d tokens, fewer than one batch of %d x %d (+1): no validation loss "
                    "will be reported", len(run.val_tokens), run.cfg.batch_size, run.cfg.seq_len)


def evaluate(run: Run, params) -> dict:
  total, count = 0.0, 0
  for batch in data_lib.eval_batches(run.val_tokens, run.cfg.seq_len, run.cfg.batch_size, run.cfg.eval_batches):
    loss, n = jax.device_get(run.eval_step(params, _batch_to_devices(batch, run.batch_sharding)))
    total, count = total + float(loss) * int(n), count + int(n)
  if count == 0:
    return {}
  return {"val_loss": total / count, "val_ppl": math.exp(min(total / count, 700.0))}


def _memory():
  stats = jax.local_devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def train(cfg, workdir: str, *, stop_at: int | None = None) -> dict:
  """Trains to cfg.steps (resuming from workdir's newest readable checkpoint); returns the last metrics record
  (read back from metrics.jsonl when the run had already finished).

  stop_at: end this invocation after that step (saving it) as a preempted job would; the schedule still spans
  cfg.steps, so a later call continues the same run.
  ConfigError (a bad config or workdir) and data.DataError (e.g. workdir's tokenizer trained on other data) come
  before anything runs. A gs:// workdir holds the checkpoints; the tokenizer, metrics and plot are written in a local
  folder (checkpoint.local_folder) and copied to the URL (metrics at every checkpoint).
  """
  validate(cfg)
  if problem := checkpoint_lib.check_storage(workdir):
    raise ConfigError(problem)
  folder, url = checkpoint_lib.local_folder(workdir), checkpoint_lib.is_url(workdir)
  _make_run_directory(cfg, folder)
  if url:
    checkpoint_lib.pull(workdir, folder)
  run = setup(cfg, folder)
  if url and jax.process_index() == 0:
    checkpoint_lib.push(folder, workdir, checkpoint_lib.TOKENIZER)
  _warn_without_validation(run)
  ckpt = checkpoint_lib.Checkpointer(workdir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                                     async_save=cfg.async_checkpoints)
  saved = ckpt.all_steps()
  restored = ckpt.restore_latest(run.state)
  start = 0
  if restored is not None:
    start, run.state, data_state, _ = restored
    run.batches.restore(data_state)
    logging.info("resumed from step %d in %s", start, ckpt.directory)
  else:
    logging.info("starting from step 0: %s", f"no checkpoint in {ckpt.directory}" if not saved else
                 f"none of the {len(saved)} checkpoint(s) in {ckpt.directory} is readable (moved to "
                 f"{ckpt.quarantine})")
    run.state = run.init_state()
  counts = models.param_counts(run.codec.to_model(run.state["params"]))
  meta = {"config": cfg.to_dict(), "param_counts": counts}
  logging.info("model: %s parameters (%s non-embedding); %d devices (%s) in %d process(es), %s parameters",
               f"{counts['total']:,}", f"{counts['non_embedding']:,}", jax.device_count(),
               jax.devices()[0].device_kind, jax.process_count(),
               "sharded (fsdp)" if cfg.fsdp else "replicated")
  writer = metrics_lib.MetricsWriter(folder, resume_step=start, enabled=jax.process_index() == 0)
  record, last_log, t_prev = {}, time.time(), time.time()
  end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
  if start >= end:
    if start >= cfg.steps:
      logging.info("step %d of %d is done already in %s: nothing to train", start, cfg.steps, ckpt.directory)
    else:
      logging.info("stop_at=%s: nothing to train past step %d", stop_at, start)
    record = metrics_lib.record_at(folder, start)
  try:
    for step in range(start, end):
      batch = _batch_to_devices(next(run.batches), run.batch_sharding)
      run.state, out = run.train_step(run.state, batch)
      out = jax.device_get(out)
      now = time.time()
      record = {"step": step + 1, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]),
                "lr": float(out["lr"]), "tokens_per_s": int(out["tokens"]) / max(now - t_prev, 1e-9)}
      t_prev = now
      if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
        ckpt.wait()
        raise FloatingPointError(
            f"non-finite loss {record['loss']} or gradient norm {record['grad_norm']} at step {step + 1}; "
            f"stopping without saving it (the newest checkpoint is step {ckpt.latest_step()} in {ckpt.directory})")
      last = step + 1 == end
      if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
        record.update(evaluate(run, run.state["params"]))
      record.update(_memory())
      writer.write(record)
      if ckpt.save(step + 1, run.state, run.batches.state(), meta, force=last) and url and writer.enabled:
        checkpoint_lib.push(folder, workdir, checkpoint_lib.METRICS)
      if last or now - last_log >= cfg.log_every_s:
        last_log = now
        logging.info("step %d/%d loss %.4f%s lr %.2e grad_norm %.3f %.0f tokens/s", step + 1, cfg.steps,
                     record["loss"], f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else "",
                     record["lr"], record["grad_norm"], record["tokens_per_s"])
  finally:
    ckpt.close()
    writer.close()
  if jax.process_index() == 0 and cfg.plot:
    metrics_lib.plot_losses(folder)
  if url and jax.process_index() == 0:
    checkpoint_lib.push(folder, workdir)
  return record
