r"""The fused loss next to the materialised-logits loss at a small realistic shape (runs on CPU in ~1 minute).

  python experiments/demo_loss.py                       # N=2048 tokens, D=256, V=32768, fp32
  python experiments/demo_loss.py --tokens=8192 --hidden=2304 --vocab=256000 --dtype=bfloat16 --softcap=30   # on a GPU

For each method it prints the loss, the gradient norms, the median time of the forward and of loss + gradient,
and the temporary memory XLA reserves for the compiled loss + gradient program. Optionally writes JSON (--out).
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import cce_jax
from cce_jax.ops.linear_cross_entropy.timing import median_ms

_N = flags.DEFINE_integer("tokens", 2048, "Tokens (batch × sequence).")
_D = flags.DEFINE_integer("hidden", 256, "Hidden size.")
_V = flags.DEFINE_integer("vocab", 32768, "Vocabulary size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
_SOFTCAP = flags.DEFINE_float("softcap", None, "Optional logit softcap.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (after one warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "Input seed.")
_OUT = flags.DEFINE_string("out", None, "Optional path of a JSON file for the results.")


def naive_loss(e, c, targets, softcap=None):
  """What one writes by hand: the N×V logits in the input dtype, then optax's cross-entropy."""
  logits = (e @ c.T).astype(jnp.float32)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def fused_loss(implementation):
  return lambda e, c, targets, softcap=None: cce_jax.linear_cross_entropy(
      e, c, targets, softcap=softcap, implementation=implementation)


def measure(name, loss_fn, e, c, targets, softcap, repeats):
  forward = jax.jit(lambda e, c: loss_fn(e, c, targets, softcap))
  both = jax.jit(jax.value_and_grad(lambda e, c: loss_fn(e, c, targets, softcap), argnums=(0, 1)))
  loss, (de, dc) = both(e, c)
  memory = both.lower(e, c).compile().memory_analysis()
  norm = lambda x: float(jnp.linalg.norm(x.astype(jnp.float32)))
  return dict(
      method=name, loss=float(loss), grad_e_norm=norm(de), grad_c_norm=norm(dc),
      forward_ms=median_ms(forward, (e, c), repeats), loss_and_grad_ms=median_ms(both, (e, c), repeats),
      temp_mib=memory.temp_size_in_bytes / 2**20)


def main(argv):
  del argv
  n, d, v, dtype = _N.value, _D.value, _V.value, jnp.dtype(_DTYPE.value)
  ks = jax.random.split(jax.random.key(_SEED.value), 3)
  e = jax.random.normal(ks[0], (n, d), jnp.float32).astype(dtype)
  c = (jax.random.normal(ks[1], (v, d), jnp.float32) * (2.0 / np.sqrt(d))).astype(dtype)
  targets = jax.random.randint(ks[2], (n,), 0, v)
  print(f"N={n} D={d} V={v} dtype={dtype.name} softcap={_SOFTCAP.value} on {jax.devices()[0].device_kind} "
        f"(jax {jax.__version__}); N×V fp32 logits = {n * v * 4 / 2**20:.0f} MiB")
  methods = [("naive (materialised)", naive_loss), ("xla_chunked (fused)", fused_loss("xla_chunked"))]
  rows = [measure(name, fn, e, c, targets, _SOFTCAP.value, _REPEATS.value) for name, fn in methods]
  print()
  print("| method | loss | ‖dE‖ | ‖dC‖ | forward ms | loss+grad ms | temp MiB (loss+grad) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['loss']:.6f} | {r['grad_e_norm']:.5g} | {r['grad_c_norm']:.5g} | "
          f"{r['forward_ms']:.1f} | {r['loss_and_grad_ms']:.1f} | {r['temp_mib']:.1f} |")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(dict(n=n, d=d, v=v, dtype=dtype.name, softcap=_SOFTCAP.value, jax=jax.__version__,
                     device=jax.devices()[0].device_kind, rows=rows), f, indent=2)


if __name__ == "__main__":
  app.run(main)
