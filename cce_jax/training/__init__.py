"""Training of the `cce_jax.models` language models: the loop behind experiments/train.py and its parts.

Modules (imported by name; this package re-exports nothing, so importing it stays cheap):
  config: the training config (every field with its default) and model_config (its model part).
  validate: the config's checks (one-line errors before anything runs).
  loss_keywords: `loss` and `loss_gradient` turned into the model loss's keywords (one default: full).
  trainer: the loop (data, model, sharding, optimizer, checkpoints, metrics).
  step: the jitted train and eval steps over a device mesh.
  optim: AdamW with its LR schedules and gradient clipping.
  params: an NNX model <-> a flat {"path/to/param": array} dict.
  checkpoint: Orbax checkpoints of a run.
  metrics: metrics.jsonl, TensorBoard and the loss plot.
  hidden_states: last-layer hidden states of a trained run, for the loss benchmark.
"""
