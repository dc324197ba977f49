"""Blockwise per-token logit statistics in plain XLA, with a hand-written backward (runs on every platform).

The loss never materialises the N×V logits. The forward walks [block_n, block_v] tiles of `s = f(e @ c.T + b)`
(f: optional softcap, then temperature) with an online log-sum-exp and returns, per token,

  lse          = logsumexp_v s_v
  target_logit = s_t                       (0 when t is outside [0, V))
  sum_logits   = sum_v s_v                 (for label smoothing; only when requested)
  mean_logit   = sum_v softmax(s)_v s_v    (for the entropy; only when requested)

All losses of this op are plain jnp formulas over these four fp32 vectors, so one custom_vjp serves them all: the
backward receives the four per-token cotangents, recomputes each logit tile, forms

  dS = (g_lse + g_mean * (1 + s - mean_logit)) * softmax(s) + g_target * onehot(t) + g_sum

and accumulates dE = dZ @ c and dC = dZ.T @ e tile by tile (dZ = dS * ds/dz). The only residual beyond the inputs
is the fp32 LSE (and mean_logit when the entropy is asked for).

Gradient filtering (Wijmans et al. 2024, §4.3): with `filter_eps`, a tile whose |dS| / max(|g_lse|, |g_target|,
|g_mean|) is below `filter_eps` everywhere skips its two gradient GEMMs. For the cross-entropy that ratio is
|softmax - onehot|, the paper's criterion.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
from jax import lax

from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig
from cce_jax.ops.linear_cross_entropy.stats_losses import LogitStats


@dataclasses.dataclass(frozen=True)
class StatsSpec:
  """Static description of one statistics computation (hashable: it keys the custom_vjp)."""

  softcap: float | None
  inv_temperature: float
  with_sum: bool
  with_mean: bool
  config: XlaChunkedConfig
  exact: bool
  filter_eps: float | None


def cross_entropy_per_token(e_ND, c_VD, bias_V, targets_N, valid_N, *, softcap, label_smoothing, z_loss,
                            filter_eps, exact, config, combine=None, vocab_size=None):
  """Per-token loss [N] (0 where not valid_N) and LSE [N], fp32, without the N×V logits. combine: applied to the
  statistics before the loss (a vocabulary split's merge), with the split's `vocab_size`."""
  spec = StatsSpec(softcap=softcap, inv_temperature=1.0, with_sum=bool(label_smoothing), with_mean=False,
                   config=config, exact=exact, filter_eps=filter_eps)
  stats = logit_stats(e_ND, c_VD, bias_V, targets_N, spec)
  stats = stats if combine is None else combine(stats)
  return stats_losses.cross_entropy(stats, valid_N, vocab_size=vocab_size or c_VD.shape[0],
                                    label_smoothing=label_smoothing, z_loss=z_loss)


def logprobs_per_token(e_ND, c_VD, bias_V, targets_N, *, softcap, temperature, exact, config, combine=None):
  """log p(target) [N] and entropy [N] of softmax(logits / temperature), fp32, without the N×V logits."""
  spec = StatsSpec(softcap=softcap, inv_temperature=1.0 / temperature, with_sum=False, with_mean=True,
                   config=config, exact=exact, filter_eps=None)
  stats = logit_stats(e_ND, c_VD, bias_V, targets_N, spec)
  return stats_losses.logprobs(stats if combine is None else combine(stats))


def logit_stats(e_ND, c_VD, bias_V, targets_N, spec: StatsSpec) -> LogitStats:
  """Per-token LSE, target logit, logit sum and softmax-mean logit without the N×V logits.

  Args:
    e_ND: [N, D] hidden states (bf16, f16, f32 or f64).
    c_VD: [V, D] classifier.
    bias_V: [V] bias or None.
    targets_N: [N] int targets; entries outside [0, V) match no column (their target_logit is 0).
    spec: static options; `spec.config` must already be clamped to (N, V).

  Returns:
    LogitStats of [N] arrays in fp32 (f64 for f64 inputs). Fields not requested by the spec are zeros.
  """
  return LogitStats(*_stats(spec, e_ND, c_VD, bias_V, targets_N))


def acc_dtype(*dtypes):
  """fp32, or wider for wider inputs (f64 inputs accumulate in f64, for finite-difference checks)."""
  return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes))


def _precision(spec):
  return lax.Precision.HIGHEST if spec.exact else None


def transform(z, spec):
  """s = f(z) and ds/dz for the softcap-then-temperature transform (elementwise, in z's dtype)."""
  if spec.softcap is None:
    return z * spec.inv_temperature, spec.inv_temperature
  t = jnp.tanh(z / spec.softcap)
  return t * (spec.softcap * spec.inv_temperature), spec.inv_temperature * (1.0 - t * t)


def _logit_tile(e_blk, c_blk, b_blk, spec, acc):
  """z = e_blk @ c_blk.T (+ b) with fp32 (or wider) accumulation: [bn, bv]."""
  compute = jnp.result_type(e_blk.dtype, c_blk.dtype)
  z = lax.dot_general(
      e_blk.astype(compute), c_blk.astype(compute), (((1,), (1,)), ((), ())),
      preferred_element_type=acc, precision=_precision(spec))
  if b_blk is not None:
    z = z + b_blk.astype(acc)[None, :]
  return z


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def block_start(i, block, size):
  """(start, first): block i of `block` entries starts at `first`; a block that would run past `size` is moved
  back to end at the edge (start < first), and its entries before `first` belong to the previous block."""
  first = i * block
  return jnp.minimum(first, size - block), first


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(spec, e_ND, c_VD, bias_V, targets_N):
  return _stats_fwd(spec, e_ND, c_VD, bias_V, targets_N)[0]


def _stats_fwd(spec, e_ND, c_VD, bias_V, targets_N):
  n, d = e_ND.shape
  v = c_VD.shape[0]
  bn, bv = spec.config.block_n, spec.config.block_v
  acc = acc_dtype(e_ND.dtype, c_VD.dtype)
  zeros = jnp.zeros((n,), acc)
  # m: running max, l: running sum of exp(s - m), w: running sum of exp(s - m) * s.
  init = manual_axes.vary(dict(m=jnp.full((n,), -jnp.inf, acc), l=zeros, st=zeros, ssum=zeros, w=zeros),
                          manual_axes.axes(e_ND))

  def v_step(state, j):
    v_start, v_first = block_start(j, bv, v)
    c_blk = lax.dynamic_slice(c_VD, (v_start, 0), (bv, d))
    b_blk = None if bias_V is None else lax.dynamic_slice(bias_V, (v_start,), (bv,))
    cols = v_start + jnp.arange(bv)
    col_new = cols >= v_first

    def n_step(state, i):
      n_start, n_first = block_start(i, bn, n)
      row_new = (n_start + jnp.arange(bn)) >= n_first
      e_blk = lax.dynamic_slice(e_ND, (n_start, 0), (bn, d))
      t_blk = lax.dynamic_slice(targets_N, (n_start,), (bn,))
      old = {k: lax.dynamic_slice(x, (n_start,), (bn,)) for k, x in state.items()}
      s, _ = transform(_logit_tile(e_blk, c_blk, b_blk, spec, acc), spec)
      s_masked = jnp.where(col_new[None, :], s, -jnp.inf)
      m_new = jnp.maximum(old["m"], jnp.max(s_masked, axis=1))
      rescale = jnp.exp(old["m"] - m_new)
      p_unnorm = jnp.exp(s_masked - m_new[:, None])
      new = dict(
          m=m_new,
          l=old["l"] * rescale + jnp.sum(p_unnorm, axis=1),
          st=old["st"] + jnp.sum(
              jnp.where((cols[None, :] == t_blk[:, None]) & col_new[None, :], s, 0.0), axis=1),
          ssum=(old["ssum"] + jnp.sum(jnp.where(col_new[None, :], s, 0.0), axis=1)
                if spec.with_sum else old["ssum"]),
          w=(old["w"] * rescale + jnp.sum(p_unnorm * jnp.where(col_new[None, :], s, 0.0), axis=1)
             if spec.with_mean else old["w"]),
      )
      return {
          k: lax.dynamic_update_slice(state[k], jnp.where(row_new, new[k], old[k]), (n_start,))
          for k in state
      }, None

    state, _ = lax.scan(n_step, state, jnp.arange(_cdiv(n, bn)))
    return state, None

  state, _ = lax.scan(v_step, init, jnp.arange(_cdiv(v, bv)))
  lse = state["m"] + jnp.log(state["l"])
  mean = state["w"] / state["l"] if spec.with_mean else zeros
  out = (lse, state["st"], state["ssum"], mean)
  return out, (e_ND, c_VD, bias_V, targets_N, lse, mean)


def backward_cotangents(spec, residuals, cotangents):
  """The four per-token cotangents in the accumulation dtype (zeros for statistics the spec did not compute),
  and 1 / max(|g_lse|, |g_target|, |g_mean|) per token: 0 for tokens without cotangent, NaN kept as NaN so that
  a NaN loss reaches the gradients. Shared by every backend's backward."""
  lse = residuals[4]
  g_lse, g_st, g_sum, g_mean = (g.astype(lse.dtype) for g in cotangents)
  if not spec.with_sum:
    g_sum = jnp.zeros_like(g_sum)
  if not spec.with_mean:
    g_mean = jnp.zeros_like(g_mean)
  row_scale = jnp.maximum(jnp.maximum(jnp.abs(g_lse), jnp.abs(g_st)), jnp.abs(g_mean))
  inv_row_scale = jnp.where(row_scale == 0, 0.0, 1.0 / jnp.where(row_scale == 0, 1.0, row_scale))
  return (g_lse, g_st, g_sum, g_mean), inv_row_scale


def tile_dlogits(s, cols, targets, lse, mean, g_lse, g_st, g_sum, g_mean, spec):
  """dS = (g_lse + g_mean (1 + s - mean)) softmax(s) + g_target onehot(t) + g_sum for one [bn, bv] logit tile.

  s: [bn, bv] transformed logits; cols: [bv] their vocabulary indices; every other array is a [bn, 1] column.
  Shared by the XLA and Pallas backwards (plain jnp, so it lowers inside a kernel too).
  """
  coef = g_lse
  if spec.with_mean:
    coef = coef + g_mean * (1.0 + s - mean)
  ds = coef * jnp.exp(s - lse) + jnp.where(cols[None, :] == targets, g_st, 0.0)
  if spec.with_sum:
    ds = ds + g_sum
  return ds


def stats_backward(spec, residuals, cotangents):
  """The backward of `logit_stats`: (dE, dC, dbias, None) from its residuals and output cotangents."""
  e_ND, c_VD, bias_V, targets_N, lse, mean = residuals
  (g_lse, g_st, g_sum, g_mean), inv_row_scale = backward_cotangents(spec, residuals, cotangents)
  n, d = e_ND.shape
  v = c_VD.shape[0]
  bn, bv = spec.config.block_n, spec.config.block_v
  acc = lse.dtype
  # dZ goes into the gradient GEMMs in the inputs' dtype (as the logits GEMM takes e and c), fp32 accumulation.
  mm = jnp.result_type(e_ND.dtype, c_VD.dtype)
  # Rows with no cotangent contribute nothing; masking them also keeps NaNs of ignored rows out of dC. A NaN
  # cotangent (a token with an out-of-range target) stays live, so the NaN reaches the gradients.
  row_live = (inv_row_scale != 0) | (g_sum != 0)

  def tile_grads(e_blk, c_blk, dz):
    dz_mm = dz.astype(mm)
    de = lax.dot_general(dz_mm, c_blk.astype(mm), (((1,), (0,)), ((), ())),
                         preferred_element_type=acc, precision=_precision(spec))
    dc = lax.dot_general(dz_mm, e_blk.astype(mm), (((0,), (0,)), ((), ())),
                         preferred_element_type=acc, precision=_precision(spec))
    return de, dc, jnp.sum(dz, axis=0)

  def v_step(carry, j):
    de_acc, dc, db = carry
    v_start, v_first = block_start(j, bv, v)
    c_blk = lax.dynamic_slice(c_VD, (v_start, 0), (bv, d))
    b_blk = None if bias_V is None else lax.dynamic_slice(bias_V, (v_start,), (bv,))
    cols = v_start + jnp.arange(bv)
    col_new = cols >= v_first

    def n_step(carry, i):
      de_acc, dc_blk, db_blk = carry
      n_start, n_first = block_start(i, bn, n)
      rows = lambda x: lax.dynamic_slice(x, (n_start,), (bn,))
      row_ok = ((n_start + jnp.arange(bn)) >= n_first) & rows(row_live)
      e_blk = lax.dynamic_slice(e_ND, (n_start, 0), (bn, d))
      s, dsdz = transform(_logit_tile(e_blk, c_blk, b_blk, spec, acc), spec)
      col = lambda x: rows(x)[:, None]
      ds = tile_dlogits(s, cols, col(targets_N), col(lse), col(mean), col(g_lse), col(g_st), col(g_sum),
                        col(g_mean), spec)
      ds = jnp.where(row_ok[:, None] & col_new[None, :], ds, 0.0)
      dz = ds * dsdz
      if spec.filter_eps is None:
        de_t, dc_t, db_t = tile_grads(e_blk, c_blk, dz)
      else:
        keep = ~(jnp.max(jnp.abs(ds) * rows(inv_row_scale)[:, None]) < spec.filter_eps)
        de_t, dc_t, db_t = lax.cond(
            keep, tile_grads,
            lambda *_: manual_axes.vary((jnp.zeros((bn, d), acc), jnp.zeros((bv, d), acc), jnp.zeros((bv,), acc)),
                                        manual_axes.axes(e_ND)),
            e_blk, c_blk, dz)
      de_acc = lax.dynamic_update_slice(
          de_acc, lax.dynamic_slice(de_acc, (n_start, 0), (bn, d)) + de_t, (n_start, 0))
      return (de_acc, dc_blk + dc_t, db_blk + db_t), None

    blk_init = manual_axes.vary((jnp.zeros((bv, d), acc), jnp.zeros((bv,), acc)), manual_axes.axes(e_ND))
    (de_acc, dc_blk, db_blk), _ = lax.scan(n_step, (de_acc,) + blk_init, jnp.arange(_cdiv(n, bn)))
    # Each column is final after its block; the columns a moved-back last block revisits hold zeros in
    # dc_blk, so adding them into the earlier values is exact in any dtype.
    dc = lax.dynamic_update_slice(
        dc, lax.dynamic_slice(dc, (v_start, 0), (bv, d)) + dc_blk.astype(dc.dtype), (v_start, 0))
    if db is not None:
      db = lax.dynamic_update_slice(
          db, lax.dynamic_slice(db, (v_start,), (bv,)) + db_blk.astype(db.dtype), (v_start,))
    return (de_acc, dc, db), None

  init = manual_axes.vary((
      jnp.zeros((n, d), acc),
      jnp.zeros(c_VD.shape, c_VD.dtype),
      None if bias_V is None else jnp.zeros(bias_V.shape, bias_V.dtype),
  ), manual_axes.axes(e_ND))
  (de_acc, dc, db), _ = lax.scan(v_step, init, jnp.arange(_cdiv(v, bv)))
  return de_acc.astype(e_ND.dtype), dc, db, None


_stats.defvjp(_stats_fwd, stats_backward)
