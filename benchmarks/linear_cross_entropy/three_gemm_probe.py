r"""Probe: how fast can the gradient-in-the-forward pipeline (three GEMMs, a chunk of logits held) run in XLA?

    python -m benchmarks.linear_cross_entropy.three_gemm_probe --shapes=gemma2_2b --chunks=2048,4096

Per chunk of tokens: logits by one GEMM (bf16 or fp32 out), the row LSE, d(logits) in bf16, dE = dZ @ c (bf16
out, K = V), dC += dZ.T @ e (fp32 accumulator). Mean cross-entropy, optional softcap. Timed next to naive XLA's
loss + gradient on the same tensors, errors against the fp32 reference.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.linear_cross_entropy.harness import loss_fn
from benchmarks.linear_cross_entropy.harness import rel_err
from benchmarks.linear_cross_entropy.inputs import SHAPES
from benchmarks.linear_cross_entropy.inputs import make_inputs
from cce_jax.ops.linear_cross_entropy.timing import median_ms

_SHAPES = flags.DEFINE_list("shapes", ["gemma2_2b"], "Shapes.")
_CHUNKS = flags.DEFINE_list("chunks", ["2048", "4096"], "Tokens per chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs.")


def three_gemm(e, c, t, softcap, chunk, logits_dtype):
  """(mean loss, dE, dC) with the gradient formed chunk by chunk."""
  n, d = e.shape
  v = c.shape[0]
  chunks = n // chunk
  inv_n = 1.0 / n

  def body(dc_acc, i):
    e_blk = lax.dynamic_slice_in_dim(e, i * chunk, chunk)
    t_blk = lax.dynamic_slice_in_dim(t, i * chunk, chunk)
    z = jnp.dot(e_blk, c.T, preferred_element_type=logits_dtype).astype(jnp.float32)
    if softcap is not None:
      th = jnp.tanh(z / softcap)
      s = softcap * th
    else:
      s = z
    lse = jax.nn.logsumexp(s, axis=1)
    st = jnp.take_along_axis(s, t_blk[:, None], axis=1)[:, 0]
    p = jnp.exp(s - lse[:, None])
    ds = p * inv_n
    ds = ds.at[jnp.arange(chunk), t_blk].add(-inv_n)
    dz = (ds * (1.0 - th * th) if softcap is not None else ds).astype(e.dtype)
    de = jnp.dot(dz, c, preferred_element_type=jnp.float32).astype(e.dtype)
    dc_acc = dc_acc + lax.dot_general(dz, e_blk, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dc_acc, (jnp.sum(lse - st), de)

  dc, (losses, de) = lax.scan(body, jnp.zeros((v, d), jnp.float32), jnp.arange(chunks))
  return jnp.sum(losses) * inv_n, de.reshape(n, d), dc.astype(c.dtype)


def main(argv):
  del argv
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  for name in _SHAPES.value:
    n, d, v, softcap = SHAPES[name]
    e, c, t = make_inputs(n, d, v, jnp.bfloat16, "random")
    ref = jax.jit(jax.value_and_grad(loss_fn("reference", softcap), argnums=(0, 1)))(
        e.astype(jnp.float32), c.astype(jnp.float32), t)
    naive = jax.jit(jax.value_and_grad(loss_fn("naive", softcap), argnums=(0, 1)))
    ms = median_ms(naive, (e, c, t), _REPEATS.value)
    loss, (de, dc) = naive(e, c, t)
    print(dict(shape=name, method="naive", ms=round(ms, 2), err_de=rel_err(de, ref[1][0]),
               err_dc=rel_err(dc, ref[1][1])), flush=True)
    for chunk_s in _CHUNKS.value:
      chunk = min(int(chunk_s), n)
      for ldt in (jnp.bfloat16, jnp.float32):
        f = jax.jit(lambda a, b, tt, ch=chunk, dt=ldt: three_gemm(a, b, tt, softcap, ch, dt))
        try:
          mem = f.lower(e, c, t).compile().memory_analysis().temp_size_in_bytes / 2**20
          ms = median_ms(f, (e, c, t), _REPEATS.value)
          loss, de, dc = f(e, c, t)
          print(dict(shape=name, chunk=chunk, logits=jnp.dtype(ldt).name, ms=round(ms, 2), temp_mib=round(mem),
                     err_loss=rel_err(loss, ref[0]), err_de=rel_err(de, ref[1][0]),
                     err_dc=rel_err(dc, ref[1][1])), flush=True)
        except Exception as err:  # pylint: disable=broad-except
          print(dict(shape=name, chunk=chunk, error=str(err)[:200]), flush=True)


if __name__ == "__main__":
  app.run(main)
