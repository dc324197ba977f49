r"""Saves last-layer hidden states, the classifier and the targets of a trained run, for bench_loss's `lm` regime.

  python experiments/dump_hidden.py --workdir=runs/small --out=runs/small/hidden.npz --tokens=8192

Restores the newest checkpoint of --workdir, runs the model on the start of the validation split (the run's own
tokenizer and data settings) and writes e [N, D] (float32), c [V, D] (float32), targets [N] (int32) to an .npz.
Then: `python experiments/bench_loss.py --regimes=lm --lm_file=runs/small/hidden.npz`.
"""

from __future__ import annotations

from absl import app
from absl import flags

from cce_jax.training import hidden_states

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_OUT = flags.DEFINE_string("out", None, "Output .npz path.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Number of positions to save (whole batches of the run's shape).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  print(hidden_states.dump(_WORKDIR.value, _OUT.value, _TOKENS.value), flush=True)


if __name__ == "__main__":
  app.run(main)
