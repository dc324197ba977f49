"""The reduced loss of the "pallas_gpu" backend with its gradient formed in the forward pass: three N·V·D GEMMs
instead of the recomputing backward's four (`PallasGpuConfig.forward_gradient`).

For reduction "mean" or "sum" every token's weight in the loss is known before the backward pass. Per chunk of
tokens, the kernel of `mosaic_scaled_exp` computes the logits once and writes X = exp(s - ref)·ds/dz in bf16
with the sums that give each row's LSE; then, with r = g_lse·exp(ref - lse) per row (g_lse, g_target: the
per-token loss's cotangents, from its formula by `jax.vjp`),

  dE_chunk = r ⊙ (X @ c) + a_t·c[t]                         (one GEMM, K = V)
  dC      += Xᵀ @ (r ⊙ e_chunk) + scatter of a_t·e at the targets   (one GEMM, fp32 accumulator)

where X leaves out each row's target column, whose dZ, a_t = (g_lse·p_t + g_target)·ds/dz_t, is formed in fp32
(p_t - 1 of a confident row would otherwise cancel
against a rounded p_t)

(+ the uniform term of label smoothing, rank one without a softcap). The GEMMs are XLA's. The gradients are kept
in their inputs' dtypes; the backward only scales them by the output cotangent. When the loss is not
differentiated only the forward statistics are computed (one GEMM, `pallas_gpu`).

The reference: softcap·1 (the logits' bound) when 0 < softcap ≤ `mosaic_forward.FIXED_REFERENCE_MAX`, else an
estimate of each row's LSE from a vocabulary sample (`lse_estimate`; a GEMM with ~1024 columns). Should a scored
row's sum of exp(s - ref) leave [1e-30, 1e26] (an LSE 60 nats above the reference, or 69 below), the loss and its
gradients are recomputed by `pallas_gpu`'s recomputing backward (a `lax.cond`; not taken on ordinary inputs).

Memory: X for one chunk (`forward_gradient_bytes`), the fp32 [V, D] dC accumulator, the stored gradients.
Deterministic: the chunks run in a sequential scan, the GEMMs are XLA's. In interpret mode (CPU tests) the
kernel's plain-jnp twin `mosaic_scaled_exp.reference` stands in for it; the kernel itself is tested against it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import lse_estimate
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import mosaic_forward
from cce_jax.ops.linear_cross_entropy import mosaic_pipeline
from cce_jax.ops.linear_cross_entropy import mosaic_scaled_exp
from cce_jax.ops.linear_cross_entropy import pallas_gpu
from cce_jax.ops.linear_cross_entropy import pallas_spec
from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy.base import LogitStats


def applies(config, interpret, e_NxD, c_VxD, bias_V, *, softcap, label_smoothing) -> bool:
  """Whether the loss runs this path (config.forward_gradient: "auto" on a Hopper GPU where it applies, "mosaic"
  always (else an error), "off" never). The caller has checked the reduction, exact mode and filtering."""
  reason = mosaic_pipeline.unsupported_reason(e_NxD, c_VxD, bias_V)
  if reason is None and softcap is not None and label_smoothing:
    reason = "does not take label smoothing with a softcap"
  spec = pallas_spec.Spec(stats=None, config=config, interpret=interpret)
  return pallas_spec.use_mosaic(spec, "forward_gradient", "off", reason)


@dataclasses.dataclass(frozen=True)
class _Spec:
  softcap: float | None
  label_smoothing: float
  z_loss: float
  config: object
  interpret: bool


def reduced_loss(e_NxD, c_VxD, targets_N, coef_N, *, softcap, label_smoothing, z_loss, config, interpret):
  """sum_n coef_N[n]·loss_n (fp32 scalar), differentiable in e, c and coef.

  e_NxD [N, D] bf16, c_VxD [V, D] bf16, targets_N [N] int (outside [0, V): target logit 0), coef_N [N] fp32:
  each token's weight in the reduced loss (0: ignored; NaN makes that token's loss and the gradients NaN).
  """
  spec = _Spec(softcap, label_smoothing, z_loss, config, interpret)
  return _loss(spec, e_NxD, c_VxD, targets_N, coef_N)


def _token_losses(spec, e_NxD, c_VxD, targets_N, coef_N):
  """Per-token losses [N] by `pallas_gpu`'s forward (no gradient machinery)."""
  return pallas_gpu.cross_entropy_per_token(
      e_NxD, c_VxD, None, targets_N, coef_N != 0, softcap=spec.softcap, label_smoothing=spec.label_smoothing,
      z_loss=spec.z_loss, filter_eps=None, exact=False, config=spec.config, interpret=spec.interpret)[0]


def _chunk_tokens(config, n, v):
  """Tokens per chunk: X [chunk, V'] bf16 within config.forward_gradient_bytes (at least 128 rows), the chunks
  of equal size (a multiple of 128 tokens, or all N rounded up to 8), so that padding wastes < 128 rows."""
  bn = mosaic_pipeline.BN
  per_row = pl.cdiv(v, mosaic_pipeline.BV) * mosaic_pipeline.BV * 2
  rows = max(bn, config.forward_gradient_bytes // per_row // bn * bn)
  if rows >= n:
    return pl.cdiv(n, 8) * 8
  return pl.cdiv(pl.cdiv(n, pl.cdiv(n, rows)), bn) * bn


def _reference(spec, e_NxD, c_VxD, targets_N):
  """[N] fp32, finite: the softcap's bound, or an estimate of each row's LSE."""
  n = e_NxD.shape[0]
  if spec.softcap is not None and spec.softcap <= mosaic_forward.FIXED_REFERENCE_MAX:
    return jnp.full((n,), spec.softcap, jnp.float32)
  stats = base.StatsSpec(softcap=spec.softcap, inv_temperature=1.0, with_sum=False, with_mean=False, exact=False,
                         filter_eps=None)
  ref = lse_estimate.reference(stats, e_NxD, c_VxD, None, targets_N)
  return jnp.where(jnp.isfinite(ref), ref, 0.0)


def _run(spec, e_NxD, c_VxD, targets_N, coef_N):
  """(loss_N [N] fp32, dE [N, D] fp32, dC [V, D] fp32) of sum_n coef_n·loss_n."""
  n, d = e_NxD.shape
  v = c_VxD.shape[0]
  with_sum = bool(spec.label_smoothing)
  chunk = _chunk_tokens(spec.config, n, v)
  chunks = pl.cdiv(n, chunk)
  pad = chunks * chunk - n
  ref_N = _reference(spec, e_NxD, c_VxD, targets_N)
  t32 = targets_N.astype(jnp.int32)
  e_pad, t_pad = jnp.pad(e_NxD, ((0, pad), (0, 0))), jnp.pad(t32, (0, pad))
  w_pad, ref_pad = jnp.pad(coef_N.astype(jnp.float32), (0, pad)), jnp.pad(ref_N, (0, pad))
  v_out = pl.cdiv(v, mosaic_pipeline.BV) * mosaic_pipeline.BV
  c_out = jnp.pad(c_VxD, ((0, v_out - v), (0, 0))) if v_out != v else c_VxD  # X's columns >= V are 0
  splits = spec.config.num_splits or mosaic_pipeline.default_splits(chunk, v)
  c_colsum = jnp.sum(c_VxD.astype(jnp.float32), axis=0) if with_sum else None

  def token_losses(stats, live):
    return stats_losses.cross_entropy(stats, live, vocab_size=v, label_smoothing=spec.label_smoothing,
                                      z_loss=spec.z_loss)[0]

  def block(dc_acc, i):
    rows = lambda x: lax.dynamic_slice_in_dim(x, i * chunk, chunk)
    e_blk, t_blk, w_blk, ref_blk = rows(e_pad), rows(t_pad), rows(w_pad), rows(ref_pad)
    live = w_blk != 0  # NaN weights stay live, so that NaN reaches the loss and the gradients
    if spec.interpret:
      x, (l, st, ssum) = mosaic_scaled_exp.reference(e_blk, c_VxD, t_blk, ref_blk, live, softcap=spec.softcap,
                                                     with_sum=with_sum, splits=splits)
    else:
      x, (l, st, ssum) = mosaic_scaled_exp.scaled_exp(
          e_blk, c_VxD, t_blk, ref_blk, live, softcap=spec.softcap, with_sum=with_sum, splits=splits,
          approx_math=spec.config.approx_math)
    l, st, ssum = jnp.sum(l, axis=0), jnp.sum(st, axis=0), jnp.sum(ssum, axis=0)
    lse = jnp.where(live, ref_blk + jnp.log(l), 0.0)
    stats = LogitStats(lse, st, ssum, jnp.zeros_like(lse))
    loss, pullback = jax.vjp(lambda s: token_losses(s, live), stats)
    (g,) = pullback(jnp.where(live, w_blk, 0.0))
    r = jnp.where(live, g.lse * jnp.exp(ref_blk - lse), 0.0)
    # X leaves out the target's column: its dS, g_lse·p_t + g_target (p_t - 1 for the mean loss), is formed here
    # in fp32, where it does not cancel against a rounded p_t.
    in_range = live & (t_blk >= 0) & (t_blk < v)
    dsdz_t = 1.0 if spec.softcap is None else 1.0 - jnp.square(st / spec.softcap)
    gt = jnp.where(in_range, (g.lse * jnp.exp(st - lse) + g.target_logit) * dsdz_t, 0.0)
    t_safe = jnp.where(in_range, t_blk, 0)
    e32 = jnp.where(live[:, None], e_blk.astype(jnp.float32), 0.0)
    de = r[:, None] * jnp.dot(x, c_out, preferred_element_type=jnp.float32)
    de = de + gt[:, None] * c_VxD[t_safe].astype(jnp.float32)
    e_scaled = (r[:, None] * e32).astype(e_blk.dtype)
    dc_acc = dc_acc + lax.dot_general(x, e_scaled, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dc_acc = dc_acc.at[t_safe].add(gt[:, None] * e32)
    if with_sum:  # dS += g_sum everywhere (ds/dz = 1 without a softcap): rank one
      g_sum = jnp.where(live, g.sum_logits, 0.0)
      de = de + g_sum[:, None] * c_colsum[None, :]
      dc_acc = dc_acc + (g_sum @ e32)[None, :]
    # exp(s - ref) kept its range (within a wide margin of fp32's) where the row is scored
    in_range_exp = (l > 1e-30) & (l < 1e26)
    return dc_acc, (loss, de, jnp.all(in_range_exp | ~live))

  init = manual_axes.vary(jnp.zeros((v_out, d), jnp.float32), manual_axes.axes(e_NxD))
  dc, (loss, de, finite) = lax.scan(block, init, jnp.arange(chunks))
  return loss.reshape(-1)[:n], de.reshape(-1, d)[:n], dc[:v], jnp.all(finite)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss(spec, e_NxD, c_VxD, targets_N, coef_N):
  loss_N = _token_losses(spec, e_NxD, c_VxD, targets_N, coef_N)
  return jnp.sum(coef_N.astype(loss_N.dtype) * loss_N)


def _loss_fwd(spec, e_NxD, c_VxD, targets_N, coef_N):
  def formed():
    loss_N, de, dc, finite = _run(spec, e_NxD, c_VxD, targets_N, coef_N)
    return loss_N, de.astype(e_NxD.dtype), dc.astype(c_VxD.dtype), finite

  def recomputed():  # an overflow of exp(s - ref): the recomputing path's loss and gradients
    (loss_N, vjp) = jax.vjp(lambda e, c: _token_losses(spec, e, c, targets_N, coef_N), e_NxD, c_VxD)
    de, dc = vjp(coef_N.astype(loss_N.dtype))
    return manual_axes.vary((loss_N, de, dc), names)

  # Under shard_map both branches' outputs must carry the same manual axes (`finite` varies with the tokens).
  names = manual_axes.axes(e_NxD, c_VxD, targets_N, coef_N)
  loss_N, de, dc, finite = formed()
  loss_N, de, dc = lax.cond(finite, lambda: manual_axes.vary((loss_N, de, dc), names), recomputed)
  loss = jnp.sum(coef_N.astype(loss_N.dtype) * loss_N)
  return loss, (loss_N.astype(coef_N.dtype), de, dc)


def _loss_bwd(spec, residuals, g):
  del spec

  def scale(x):
    wide = jnp.promote_types(jnp.float32, x.dtype)
    return (g.astype(wide) * x.astype(wide)).astype(x.dtype)

  loss_N, de, dc = residuals
  return scale(de), scale(dc), None, scale(loss_N)


_loss.defvjp(_loss_fwd, _loss_bwd)
