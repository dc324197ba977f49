"""Last-layer hidden states, classifier and targets of a trained run, for the loss benchmark's `lm` regime."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax import data as data_lib
from cce_jax.training import checkpoint as checkpoint_lib
from cce_jax.training import config as config_lib
from cce_jax.training import trainer


def run_config(saved: dict):
  """The training config a checkpoint saved, over base_config's defaults (for fields added since)."""
  cfg = config_lib.base_config()
  cfg.update(saved)
  return cfg


def restore(workdir: str):
  """(cfg, run, step, model) of workdir's newest readable checkpoint: the run's config, its `trainer.setup` (the
  tokenizer, data and validation tokens), the step and the decoder with the restored parameters."""
  ckpt = checkpoint_lib.Checkpointer(workdir, every=0, keep=1 << 30)
  try:
    cfg = run_config(ckpt.latest_meta()["config"])
    run = trainer.setup(cfg, workdir)
    restored = ckpt.restore_latest(run.state)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
  step, state, _, _ = restored
  return cfg, run, step, run.codec.to_model(state["params"])


def dump(workdir: str, out: str, tokens: int) -> dict:
  """Restores workdir's newest checkpoint, runs the model on the start of the validation split (the run's own
  tokenizer and data settings) and writes e [tokens, D] (float32), c [V, D] (float32), targets [tokens] (int32)
  and the step to the .npz `out`; returns the step and the shapes."""
  cfg, run, step, model = restore(workdir)
  per_batch = cfg.batch_size * cfg.seq_len
  hidden_fn = jax.jit(lambda inputs: model(inputs).astype(jnp.float32))
  es, ts = [], []
  for batch in data_lib.eval_batches(run.val_tokens, cfg.seq_len, cfg.batch_size, max(1, -(-tokens // per_batch))):
    es.append(np.asarray(hidden_fn(batch["inputs"])).reshape(-1, cfg.model.D))
    ts.append(batch["targets"].reshape(-1))
  if not es:
    raise ValueError("the validation split has less than one batch of tokens")
  e, t = np.concatenate(es)[:tokens], np.concatenate(ts)[:tokens].astype(np.int32)
  c = np.asarray(model.classifier().astype(jnp.float32))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, e=e, c=c, targets=t, step=step)
  return {"step": step, "e": e.shape, "c": c.shape, "targets": t.shape}
