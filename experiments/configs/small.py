r"""small: a 126M-parameter decoder (76M non-embedding; D=768, L=12, 12/4 heads, V=32768, T=1024), one GPU.

  python experiments/train.py --config=experiments/configs/small.py --workdir=runs/small

Hardware: one H100/H200 (bf16 compute, fp32 parameters). The standard-library corpus (~14 MB, ~4M tokens at this
vocabulary) is small for this model: expect over-fitting after a few epochs; point --config.data at a larger text
glob for a real run. Time and loss: not measured yet. For the throughput of the same model at V = 128k / 256k see
experiments/bench_train.py and BENCHMARKS.md.
"""

from cce_jax.training.config import base_config


def get_config():
  c = base_config()
  c.vocab_size = 32768
  c.seq_len = 1024
  c.batch_size = 32
  c.steps = 5000
  c.model.update(D=768, H=12, KV=4, L=12, F=2048, dtype="bfloat16")
  c.optim.update(lr=1e-3, warmup_steps=200)
  c.checkpoint_every = 500
  c.eval_every = 500
  return c
