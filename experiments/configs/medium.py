r"""medium: a 350M-parameter decoder (283M non-embedding; D=1024, L=24, 16/8 heads, V=32768, T=2048), 1+ GPUs.

  python experiments/train.py --config=experiments/configs/medium.py --workdir=runs/medium
  python experiments/train.py --config=experiments/configs/medium.py --workdir=runs/medium --config.fsdp=True

Hardware: one H100/H200 or several (the batch is split over every local device; --config.fsdp=True also splits
parameters and optimizer state). Per-block remat is on so the batch fits. Bring a larger corpus through
--config.data (a text glob or hf:NAME): the standard-library sources are far too small for this model. Time and
loss: not measured yet.
"""

from cce_jax.training.config import base_config


def get_config():
  c = base_config()
  c.vocab_size = 32768
  c.seq_len = 2048
  c.batch_size = 64
  c.steps = 20000
  c.model.update(D=1024, H=16, KV=8, L=24, F=2816, dtype="bfloat16", remat=True)
  c.optim.update(lr=6e-4, warmup_steps=1000, schedule="wsd")
  c.checkpoint_every = 1000
  c.eval_every = 1000
  return c
