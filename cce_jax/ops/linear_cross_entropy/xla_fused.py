"""The reduced loss with its gradients formed in the forward pass, over row blocks of logits (`"xla_fused"`).

For a reduced loss (reduction "mean" or "sum") every token's weight in the result is known before any backward
pass, so the gradient can be formed while a block's logits are live. Per block of `block_n` tokens XLA computes
the [block_n, V] logits (fp32 accumulation), their log-sum-exp, the per-token losses, d(logits), and from them
the block's dE and its share of dC (an fp32 [V, D] accumulator) and dbias; they are stored in their inputs'
dtypes, and the backward only scales them by the output cotangent. That is three N×V×D GEMMs in all, as the
materialised loss does, where the tile-recomputing backends take four (forward, recompute, dE, dC); XLA runs
them as its own GEMMs.

The price is the dC accumulator: every block reads and writes the fp32 [V, D] sum once (2 × 2.4 GB per block at
V = 256k, D = 2304), so blocks must be large: the default holds about 2^27 logits (512 MiB in fp32, 524 rows at
V = 256k). Memory: one block of fp32 logits and its d(logits), the fp32 [V, D] accumulator and the stored
gradients. No gradient filtering. Deterministic (the blocks run in a sequential scan). When the loss is not
differentiated only the loss is computed (one GEMM).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy.base import LogitStats
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig

# Logits per row block of the default config: 2^27 fp32 logits are 512 MiB.
_BLOCK_ELEMENTS = 1 << 27


def default_config(n: int, v: int) -> XlaChunkedConfig:
  """Rows per block such that a block holds about 2^27 logits (block_v is unused: a block spans all of V)."""
  return XlaChunkedConfig(block_n=max(1, min(n, _BLOCK_ELEMENTS // v)), block_v=v)


@dataclasses.dataclass(frozen=True)
class _Spec:
  stats: base.StatsSpec
  label_smoothing: float
  z_loss: float
  block_n: int


def reduced_loss(e_NxD, c_VxD, bias_V, targets_N, coef_N, *, softcap, label_smoothing, z_loss, exact, config):
  """sum_r coef_N[r] * loss_r (fp32 scalar), differentiable in e, c, bias and coef.

  coef_N: [N] the tokens' weights in the reduced loss (0 for ignored tokens; NaN makes that token's loss and the
  gradients NaN). targets_N: [N] int; a target outside [0, V) scores a target logit of 0.
  """
  stats = base.StatsSpec(softcap=softcap, inv_temperature=1.0, with_sum=bool(label_smoothing), with_mean=False,
                         exact=exact, filter_eps=None)
  spec = _Spec(stats=stats, label_smoothing=label_smoothing, z_loss=z_loss,
               block_n=min(config.block_n, e_NxD.shape[0]))
  return _loss(spec, e_NxD, c_VxD, bias_V, targets_N, coef_N)


def _run(spec, e_NxD, c_VxD, bias_V, targets_N, coef_N, *, grads):
  """(per-token loss [N] (0 where coef is 0), and with grads: fp32 dE [N, D], dC [V, D], dbias [V] or None)
  of sum_r coef_r * loss_r."""
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  bn = spec.block_n
  blocks = -(-n // bn)
  pad = blocks * bn - n
  acc = base.acc_dtype(e_NxD.dtype, c_VxD.dtype)
  mm = jnp.result_type(e_NxD.dtype, c_VxD.dtype)
  precision = base.matmul_precision(spec.stats)
  e_pad = jnp.pad(e_NxD, ((0, pad), (0, 0)))
  t_pad = jnp.pad(targets_N.astype(jnp.int32), (0, pad))
  w_pad = jnp.pad(coef_N.astype(acc), (0, pad))
  c_mm = c_VxD.astype(mm)
  cols = jnp.arange(v)

  def token_losses(stats, live):
    return stats_losses.cross_entropy(stats, live, vocab_size=v, label_smoothing=spec.label_smoothing,
                                      z_loss=spec.z_loss)[0]

  def block(carry, i):
    rows = lambda x: lax.dynamic_slice_in_dim(x, i * bn, bn)
    e_blk, t_blk, w_blk = rows(e_pad), rows(t_pad), rows(w_pad)
    z = lax.dot_general(e_blk.astype(mm), c_mm, (((1,), (1,)), ((), ())), preferred_element_type=acc,
                        precision=precision)
    if bias_V is not None:
      z = z + bias_V.astype(acc)[None, :]
    s, dsdz = base.transform(z, spec.stats)
    lse = jax.nn.logsumexp(s, axis=1)
    target_logit = jnp.sum(jnp.where(cols[None, :] == t_blk[:, None], s, 0.0), axis=1)
    total = jnp.sum(s, axis=1) if spec.stats.with_sum else jnp.zeros_like(lse)
    stats = LogitStats(lse, target_logit, total, jnp.zeros_like(lse))
    live = w_blk != 0  # NaN weights stay live, so that NaN reaches the loss and the gradients
    if not grads:
      return carry, (token_losses(stats, live),)
    dc, db = carry
    loss, pullback = jax.vjp(lambda st: token_losses(st, live), stats)
    (g,) = pullback(jnp.where(live, w_blk, 0.0))
    col = lambda x: x[:, None]
    ds = base.tile_dlogits(s, cols, col(t_blk), col(lse), col(stats.mean_logit), col(g.lse),
                                  col(g.target_logit), col(g.sum_logits), col(g.mean_logit), spec.stats)
    dz = jnp.where(col(live), ds * dsdz, 0.0)
    dz_mm = dz.astype(mm)
    de = lax.dot_general(dz_mm, c_mm, (((1,), (0,)), ((), ())), preferred_element_type=acc, precision=precision)
    dc = dc + lax.dot_general(dz_mm, e_blk.astype(mm), (((0,), (0,)), ((), ())), preferred_element_type=acc,
                              precision=precision)
    if db is not None:
      db = db + jnp.sum(dz, axis=0)
    return (dc, db), (loss, de)

  init = (jnp.zeros((v, d), acc), None if bias_V is None else jnp.zeros((v,), acc)) if grads else None
  init = manual_axes.vary(init, manual_axes.axes(e_NxD))
  carry, outs = lax.scan(block, init, jnp.arange(blocks))
  loss_N = outs[0].reshape(-1)[:n]
  if not grads:
    return (loss_N,)
  return loss_N, outs[1].reshape(-1, d)[:n], carry[0], carry[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss(spec, e_NxD, c_VxD, bias_V, targets_N, coef_N):
  (loss_N,) = _run(spec, e_NxD, c_VxD, bias_V, targets_N, coef_N, grads=False)
  return jnp.sum(coef_N.astype(loss_N.dtype) * loss_N)


def _loss_fwd(spec, e_NxD, c_VxD, bias_V, targets_N, coef_N):
  loss_N, de, dc, db = _run(spec, e_NxD, c_VxD, bias_V, targets_N, coef_N, grads=True)
  loss = jnp.sum(coef_N.astype(loss_N.dtype) * loss_N)
  # The gradients are kept in their inputs' dtypes (the backward scales them by the cotangent, usually 1).
  db = None if db is None else db.astype(bias_V.dtype)
  return loss, (loss_N.astype(coef_N.dtype), de.astype(e_NxD.dtype), dc.astype(c_VxD.dtype), db)


def _loss_bwd(spec, residuals, g):
  del spec
  def scale(x):
    if x is None:
      return None
    wide = jnp.promote_types(jnp.float32, x.dtype)
    return (g.astype(wide) * x.astype(wide)).astype(x.dtype)

  loss_N, de, dc, db = residuals
  return scale(de), scale(dc), scale(db), None, scale(loss_N)


_loss.defvjp(_loss_fwd, _loss_bwd)
