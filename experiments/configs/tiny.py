r"""tiny: a 0.9M-parameter decoder (D=128, L=2, V=2048) on 3 MB of the standard-library sources, on CPU.

  python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/cce_tiny

Hardware: any CPU; about 1 minute on 2 cores (the first run also trains the 2048-entry tokenizer: seconds).
Expected: training loss falls from 7.6 (ln 2048) to about 4.2 in 300 steps, validation loss about 4.5 (measured:
4.24 / 4.46). Loss: the fused loss ("auto" = blockwise XLA on CPU, Pallas on an NVIDIA GPU).
"""

from cce_jax.training.config import base_config


def get_config():
  c = base_config()
  c.max_bytes = 3_000_000
  c.vocab_size = 2048
  c.seq_len = 128
  c.batch_size = 16
  c.steps = 300
  c.model.update(D=128, H=4, KV=2, L=2, F=384, dtype="float32")
  c.optim.update(lr=3e-3, warmup_steps=30)
  c.checkpoint_every = 100
  c.eval_every = 100
  c.eval_batches = 4
  return c
