r"""Training-step throughput and memory of the decoder with the fused loss vs materialised logits.

  python experiments/bench_train.py --vocab=128256,256000 --losses=auto,naive --batch=8 --seq_len=1024

For each (vocabulary, loss): tokens/s of the jitted train step (AdamW included; median over --steps after a
warm-up) at --batch, the memory of that compiled step (XLA's memory analysis: arguments + outputs + temporaries −
donated aliases, i.e. the step's peak device footprint), and the largest batch whose compiled step fits the device
(doubling from --batch, then bisection to within 25%; compiles only, nothing runs). Random tokens; the `small` preset's model by default. Prints a markdown table last, JSON with --out.
Needs no ml_collections (runs on machines without it).
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cce_jax import models
from cce_jax.training import loss_keywords
from cce_jax.training import optim
from cce_jax.training import step as step_lib

_VOCAB = flags.DEFINE_list("vocab", ["128256", "256000"], "Vocabulary sizes.")
_LOSSES = flags.DEFINE_list(
    "losses", ["auto", "naive"], f"Loss implementations from {models.LOSS_IMPLEMENTATIONS}, optionally with the "
    f"fused loss's gradient mode after a colon (one of {tuple(loss_keywords.LOSS_GRADIENTS)}; default "
    f"{loss_keywords.DEFAULT_LOSS_GRADIENT}, as in training), e.g. auto:filtered.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step for the throughput comparison.")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_MODEL = flags.DEFINE_string("model", "D=768,H=12,KV=4,L=12,F=2048", "Model fields (the small preset's).")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise the blocks.")
_MAX_BATCH = flags.DEFINE_integer("max_batch_limit", 1024, "Largest batch the search tries (0: no search).")
_OUT = flags.DEFINE_string("out", None, "Folder for results.json.")


def _model_config(v):
  fields = {k: int(x) for k, x in (kv.split("=") for kv in _MODEL.value.split(","))}
  return models.Config(V=v, T=_SEQ.value, remat=_REMAT.value, **fields)


def _batch(b, v, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (b, _SEQ.value + 1), 0, v)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _compiled_bytes(steps, b, v, autotune=True):
  """Device bytes of the compiled train step at batch b. autotune=False compiles without XLA's GEMM autotuning,
  which dominates the compile time on a GPU (used by the max-batch search, which only needs the memory)."""
  shapes = jax.eval_shape(lambda: _batch(b, v))
  batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=steps.batch_sharding) for k, x in shapes.items()}
  options = None if autotune else {"xla_gpu_autotune_level": 0}
  mem = steps.train_step.lower(steps.state, batch).compile(compiler_options=options).memory_analysis()
  return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def _build(mcfg, loss, init=True):
  """loss: "IMPLEMENTATION[:GRADIENT]"."""
  implementation, _, gradient = loss.partition(":")
  return step_lib.build(mcfg, optim.OptimConfig(steps=100), loss=implementation, init=init,
                        loss_gradient=gradient or loss_keywords.DEFAULT_LOSS_GRADIENT)


def max_batch(mcfg, loss, limit_bytes):
  steps = _build(mcfg, loss, init=False)

  def fits(b):
    try:
      return _compiled_bytes(steps, b, mcfg.V, autotune=False) <= limit_bytes
    except jax.errors.JaxRuntimeError as err:  # the compiler's autotuner ran out of memory: it does not fit
      if "RESOURCE_EXHAUSTED" in str(err):
        return False
      raise

  lo, hi = 0, _BATCH.value
  while hi <= _MAX_BATCH.value and fits(hi):
    lo, hi = hi, hi * 2
  if hi > _MAX_BATCH.value:
    return lo, True
  while hi - lo > max(1, lo // 4):  # within 25%
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo, False


def run_one(v, loss, device):
  mcfg = _model_config(v)
  row = dict(vocab=v, loss=loss, batch=_BATCH.value, seq_len=_SEQ.value)
  try:
    steps = _build(mcfg, loss)
    counts = models.param_counts(steps.codec.to_model(steps.state["params"]))
    row.update(params=counts["total"], non_embedding=counts["non_embedding"])
    batch = _batch(_BATCH.value, v)
    state = steps.state
    for _ in range(2):
      state, out = steps.train_step(state, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      state, out = steps.train_step(state, batch)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    row.update(step_ms=ms, tokens_per_s=_BATCH.value * _SEQ.value / ms * 1e3, loss_value=float(out["loss"]))
    del state
    row["step_gib"] = _compiled_bytes(steps, _BATCH.value, v) / 2**30
    del steps
    stats = device.memory_stats() or {}
    if _MAX_BATCH.value and "bytes_limit" in stats:
      row["max_batch"], row["max_batch_capped"] = max_batch(mcfg, loss, stats["bytes_limit"])
  except Exception as err:  # pylint: disable=broad-except
    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
  print(json.dumps(row), flush=True)
  return row


def table(rows):
  lines = ["| V | loss | params (non-emb.) | batch × T | step ms | tokens/s | step GiB | max batch |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['vocab']} | {r['loss']} | error: {r['error'][:100]} |")
      continue
    peak = f"{r['step_gib']:.1f}" if "step_gib" in r else "-"
    mb = str(r.get("max_batch", "-")) + ("+" if r.get("max_batch_capped") else "")
    lines.append(f"| {r['vocab']} | {r['loss']} | {r['params'] / 1e6:.0f}M ({r['non_embedding'] / 1e6:.0f}M) | "
                 f"{r['batch']} × {r['seq_len']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {peak} | {mb} |")
  return "\n".join(lines)


def main(argv):
  del argv
  device = jax.local_devices()[0]
  header = f"{device.device_kind}, jax {jax.__version__}, model {_MODEL.value}, remat {_REMAT.value}"
  print(header, flush=True)
  rows = []
  for v in [int(x) for x in _VOCAB.value]:
    for loss in _LOSSES.value:
      rows.append(run_one(v, loss, device))
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
      json.dump(dict(device=device.device_kind, jax=jax.__version__, rows=rows), f, indent=2)
  print()
  print(header)
  print(table(rows))


if __name__ == "__main__":
  app.run(main)
