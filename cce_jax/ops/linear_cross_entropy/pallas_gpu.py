"""Pallas (Triton) kernels for NVIDIA GPUs: the per-token logit statistics and their backward.

Same contract as `xla_chunked.logit_stats` (see there for the math): one custom_vjp whose outputs are the
per-token LSE, target logit, logit sum and softmax-mean logit, from which `stats_losses` forms every loss.

Forward (`cce_fwd`): grid (token tiles, vocabulary splits). A program owns `block_n` tokens and one contiguous
split of the vocabulary, walks it `block_v` columns at a time, builds each [block_n, block_v] logit tile by a loop
over D in `block_d` chunks (fp32 accumulation) and keeps an online log-sum-exp; the splits are merged in XLA.
Splitting the vocabulary keeps the GPU full when N / block_n is small.

Backward. Without filtering (`filter_eps=None`) and with `exact=True` it is the blockwise XLA backward: dense
GEMMs over large blocks, no atomics, deterministic. With filtering the forward also writes each logit tile's
maximum ([N tiles, V tiles], fp32), which bounds every softmax entry of the tile by exp(tile max - the smallest
LSE of its rows); the backward turns that into a keep mask (tiles holding a live row's target always kept) and
- when at most `dense_backward_above` of the tiles are kept, runs `cce_bwd`: grid (token tiles, vocabulary
  tiles); a masked-out tile returns at once, a kept one recomputes its logits, forms dZ and, unless
  |softmax - onehot| < filter_eps on the whole tile, adds dZ @ c into dE and dZ.T @ e into dC with fp32
  atomics, D chunk by D chunk (relaxed-order atomics, `triton_atomics`);
- otherwise runs the dense XLA backward (with the same tile filter), which is faster than atomics when most
  tiles are kept. The choice is made on the device (`lax.cond`).

Triton needs power-of-2 block shapes; the dimensions need not be multiples of them: a block that would run past
the end of an array is moved back to end at the edge and its already-covered rows/columns are masked, so no
input is padded or copied.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy import triton_atomics
from cce_jax.ops.linear_cross_entropy import xla_chunked
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig
from cce_jax.ops.linear_cross_entropy.stats_losses import LogitStats


def cross_entropy_per_token(e_ND, c_VD, bias_V, targets_N, valid_N, *, softcap, label_smoothing, z_loss,
                            filter_eps, exact, config, interpret=False):
  """Per-token loss [N] (0 where not valid_N) and LSE [N], fp32, by the Pallas kernels."""
  spec = _spec(softcap, 1.0, bool(label_smoothing), False, config, exact, filter_eps, interpret)
  stats = LogitStats(*_stats(spec, e_ND, c_VD, bias_V, targets_N))
  return stats_losses.cross_entropy(stats, valid_N, vocab_size=c_VD.shape[0],
                                    label_smoothing=label_smoothing, z_loss=z_loss)


def logprobs_per_token(e_ND, c_VD, bias_V, targets_N, *, softcap, temperature, exact, config, interpret=False):
  """log p(target) [N] and entropy [N] of softmax(logits / temperature), fp32, by the Pallas kernels."""
  spec = _spec(softcap, 1.0 / temperature, False, True, config, exact, None, interpret)
  return stats_losses.logprobs(LogitStats(*_stats(spec, e_ND, c_VD, bias_V, targets_N)))


@dataclasses.dataclass(frozen=True)
class _Spec:
  stats: xla_chunked.StatsSpec  # the math options (its config is unused here)
  config: PallasGpuConfig
  interpret: bool


def _spec(softcap, inv_temperature, with_sum, with_mean, config, exact, filter_eps, interpret):
  stats = xla_chunked.StatsSpec(
      softcap=softcap, inv_temperature=inv_temperature, with_sum=with_sum, with_mean=with_mean,
      config=XlaChunkedConfig(1, 1), exact=exact, filter_eps=filter_eps)
  return _Spec(stats=stats, config=config, interpret=interpret)


# Gradient accumulation: relaxed-order fp32 atomic adds (acquire-release ones serialise each thread's adds).
_atomic_add = triton_atomics.atomic_add


def _logit_chunk(e_ref, c_ref, n_start, v_start, k, *, bn, bv, bd, d, precision):
  """The D chunk k of e[n_start:+bn] @ c[v_start:+bv].T: a [bn, bv] fp32 partial product."""
  compute = jnp.result_type(e_ref.dtype, c_ref.dtype)
  d_first = k * bd
  d_start = jnp.minimum(d_first, d - bd)
  e_blk = e_ref[pl.ds(n_start, bn), pl.ds(d_start, bd)].astype(compute)
  c_blk = c_ref[pl.ds(v_start, bv), pl.ds(d_start, bd)].astype(compute)
  if d % bd:  # the moved-back last chunk must not count its first columns twice
    e_blk = jnp.where((d_start + jnp.arange(bd) >= d_first)[None, :], e_blk, jnp.zeros_like(e_blk))
  return lax.dot_general(e_blk, c_blk, (((1,), (1,)), ((), ())),
                         preferred_element_type=xla_chunked.acc_dtype(compute), precision=precision)


def _logit_tile(e_ref, c_ref, n_start, v_start, *, bn, bv, bd, d, precision):
  """z = e[n_start:+bn] @ c[v_start:+bv].T as a [bn, bv] fp32 tile, walking D in chunks of bd."""
  acc = xla_chunked.acc_dtype(jnp.result_type(e_ref.dtype, c_ref.dtype))
  body = lambda k, z: z + _logit_chunk(e_ref, c_ref, n_start, v_start, k, bn=bn, bv=bv, bd=bd, d=d,
                                       precision=precision)
  # int32 bounds keep the loop index int32 (index arithmetic must not mix widths under jax_enable_x64).
  return lax.fori_loop(jnp.int32(0), jnp.int32(pl.cdiv(d, bd)), body, jnp.zeros((bn, bv), acc))


_PRECISION_NAMES = {
    "highest": lax.Precision.HIGHEST, "float32": lax.Precision.HIGHEST,
    "high": lax.Precision.HIGH, "tensorfloat32": lax.Precision.HIGH, "bfloat16_3x": lax.Precision.HIGH,
    "default": lax.Precision.DEFAULT, "bfloat16": lax.Precision.DEFAULT, "fastest": lax.Precision.DEFAULT,
}


def _precision(stats_spec):
  """HIGHEST for exact mode; else the user's `jax_default_matmul_precision` (TF32 for f32 inputs if unset)."""
  if stats_spec.exact:
    return lax.Precision.HIGHEST
  return _PRECISION_NAMES.get(jax.config.jax_default_matmul_precision)


def _fwd_kernel(*refs, spec, n, v, d, v_per_split, has_bias):
  cfg, st_spec = spec.config, spec.stats
  bn, bv, bd = cfg.block_n, cfg.block_v, cfg.block_d
  refs = list(refs)
  e_ref, c_ref = refs.pop(0), refs.pop(0)
  b_ref = refs.pop(0) if has_bias else None
  t_ref = refs.pop(0)
  m_ref, l_ref, st_ref, sum_ref, w_ref = refs[:5]
  tmax_ref = refs[5] if len(refs) > 5 else None

  i, j = pl.program_id(0), pl.program_id(1)
  n_start = jnp.minimum(i * bn, n - bn)
  targets = t_ref[pl.ds(n_start, bn)]
  v_lo = j * v_per_split
  v_hi = jnp.minimum(v, v_lo + v_per_split)

  precision = _precision(st_spec)

  def tile_stats(v_first, z, carry):
    """Folds one finished [bn, bv] logit tile (columns from v_first, moved back at the edge) into the stats."""
    m, l, st, ssum, w = carry
    v_start = jnp.minimum(v_first, v - bv)
    cols = v_start + jnp.arange(bv)
    col_ok = ((cols >= v_first) & (cols < v_hi))[None, :]
    if b_ref is not None:
      z = z + b_ref[pl.ds(v_start, bv)].astype(z.dtype)[None, :]
    s, _ = xla_chunked.transform(z, st_spec)
    s_ok = jnp.where(col_ok, s, 0.0)
    row_max = jnp.max(jnp.where(col_ok, s, -jnp.inf), axis=1)
    if tmax_ref is not None:  # the tile's largest logit, for the backward's skip mask
      tmax_ref[i, v_first // bv] = jnp.max(row_max)
    m_new = jnp.maximum(m, row_max)
    rescale = jnp.exp(m - m_new)
    p = jnp.where(col_ok, jnp.exp(s - m_new[:, None]), 0.0)
    l = l * rescale + jnp.sum(p, axis=1)
    st = st + jnp.sum(jnp.where(cols[None, :] == targets[:, None], s_ok, 0.0), axis=1)
    if st_spec.with_sum:
      ssum = ssum + jnp.sum(s_ok, axis=1)
    if st_spec.with_mean:
      w = w * rescale + jnp.sum(p * s_ok, axis=1)
    return m_new, l, st, ssum, w

  zeros = jnp.zeros((bn,), m_ref.dtype)
  init = (zeros - jnp.inf, zeros, zeros, zeros, zeros)
  num_tiles = (jnp.maximum(v_hi - v_lo, 0) + bv - 1) // bv
  if cfg.flat_loop:
    # One loop over (vocabulary tile, D chunk) pairs: the operand pipeline runs across tile boundaries and the
    # statistics update runs under a branch on the last D chunk.
    nd = pl.cdiv(d, bd)
    compute = jnp.result_type(e_ref.dtype, c_ref.dtype)
    acc = xla_chunked.acc_dtype(compute)

    def flat_body(k, carry):
      stats, z = carry
      t = k // nd
      kd = k - t * nd
      v_first = v_lo + t * bv
      z = z + _logit_chunk(e_ref, c_ref, n_start, jnp.minimum(v_first, v - bv), kd, bn=bn, bv=bv, bd=bd, d=d,
                           precision=precision)
      return lax.cond(kd == nd - 1, lambda a: (tile_stats(v_first, a[1], a[0]), jnp.zeros_like(a[1])),
                      lambda a: a, (stats, z))

    m, l, st, ssum, w = lax.fori_loop(0, num_tiles * nd, flat_body, (init, jnp.zeros((bn, bv), acc)))[0]
  else:
    def body(k, carry):
      v_first = v_lo + k * bv
      z = _logit_tile(e_ref, c_ref, n_start, jnp.minimum(v_first, v - bv), bn=bn, bv=bv, bd=bd, d=d,
                      precision=precision)
      return tile_stats(v_first, z, carry)

    m, l, st, ssum, w = lax.fori_loop(0, num_tiles, body, init)
  rows = pl.ds(n_start, bn)
  m_ref[j, rows] = m
  l_ref[j, rows] = l
  st_ref[j, rows] = st
  sum_ref[j, rows] = ssum
  w_ref[j, rows] = w


def _stats_fwd(spec, e_ND, c_VD, bias_V, targets_N):
  n, d = e_ND.shape
  v = c_VD.shape[0]
  cfg = spec.config
  splits = cfg.num_splits_for(n, v)
  v_per_split = pl.cdiv(pl.cdiv(v, splits), cfg.block_v) * cfg.block_v
  splits = pl.cdiv(v, v_per_split)
  part = jax.ShapeDtypeStruct((splits, n), xla_chunked.acc_dtype(e_ND.dtype, c_VD.dtype))
  args = [e_ND, c_VD] + ([bias_V] if bias_V is not None else []) + [targets_N.astype(jnp.int32)]
  out_shape = [part] * 5
  if _tile_skipping(spec):
    out_shape.append(jax.ShapeDtypeStruct((pl.cdiv(n, cfg.block_n), pl.cdiv(v, cfg.block_v)), part.dtype))
  m, l, st, ssum, w, *tmax = pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec, n=n, v=v, d=d, v_per_split=v_per_split,
                        has_bias=bias_V is not None),
      grid=(pl.cdiv(n, cfg.block_n), splits),
      in_specs=[pl.no_block_spec] * len(args),
      out_specs=[pl.no_block_spec] * len(out_shape),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=spec.interpret,
      name="cce_fwd",
  )(*args)
  # Merge the vocabulary splits.
  m_max = jnp.max(m, axis=0)
  scale = jnp.exp(m - m_max[None, :])
  l_sum = jnp.sum(l * scale, axis=0)
  lse = m_max + jnp.log(l_sum)
  mean = jnp.sum(w * scale, axis=0) / l_sum if spec.stats.with_mean else jnp.zeros_like(lse)
  out = (lse, jnp.sum(st, axis=0), jnp.sum(ssum, axis=0), mean)
  return out, (e_ND, c_VD, bias_V, targets_N, lse, mean, tmax[0] if tmax else None)


def _bwd_kernel(*refs, spec, n, v, d, has_bias):
  cfg, st_spec = spec.config, spec.stats
  bn, bv, bd = cfg.block_n, cfg.block_v, cfg.block_d
  refs = list(refs)
  e_ref, c_ref = refs.pop(0), refs.pop(0)
  b_ref = refs.pop(0) if has_bias else None
  t_ref, lse_ref, mean_ref, g_lse_ref, g_st_ref, g_sum_ref, g_mean_ref, inv_r_ref = refs[:8]
  refs = refs[8:]
  keep_ref = refs.pop(0) if st_spec.filter_eps is not None else None
  n_in = len(refs) // 2  # the zero-initialised accumulators come in aliased to the outputs
  de_ref, dc_ref = refs[n_in], refs[n_in + 1]
  db_ref = refs[n_in + 2] if has_bias else None

  i, j = pl.program_id(0), pl.program_id(1)
  n_first, v_first = i * bn, j * bv
  n_start, v_start = jnp.minimum(n_first, n - bn), jnp.minimum(v_first, v - bv)
  rows_blk = pl.ds(n_start, bn)
  rows, cols = n_start + jnp.arange(bn), v_start + jnp.arange(bv)
  row_vec = lambda ref: ref[rows_blk][:, None]

  def tile():
    z = _logit_tile(e_ref, c_ref, n_start, v_start, bn=bn, bv=bv, bd=bd, d=d, precision=_precision(st_spec))
    if b_ref is not None:
      z = z + b_ref[pl.ds(v_start, bv)].astype(z.dtype)[None, :]
    s, dsdz = xla_chunked.transform(z, st_spec)
    ds = xla_chunked.tile_dlogits(s, cols, row_vec(t_ref), row_vec(lse_ref), row_vec(mean_ref),
                                  row_vec(g_lse_ref), row_vec(g_st_ref), row_vec(g_sum_ref), row_vec(g_mean_ref),
                                  st_spec)
    live = ((rows >= n_first)[:, None] & (cols >= v_first)[None, :])
    live = live & ((row_vec(inv_r_ref) != 0) | (row_vec(g_sum_ref) != 0))
    ds = jnp.where(live, ds, 0.0)
    dz = ds * dsdz
    compute = jnp.result_type(e_ref.dtype, c_ref.dtype)
    dz_mm = dz.astype(compute)

    def accumulate():
      def body(k, carry):
        d_first = k * bd
        d_start = jnp.minimum(d_first, d - bd)
        dcols = pl.ds(d_start, bd)
        c_blk = c_ref[pl.ds(v_start, bv), dcols].astype(compute)
        e_blk = e_ref[rows_blk, dcols].astype(compute)
        de = lax.dot_general(dz_mm, c_blk, (((1,), (0,)), ((), ())), preferred_element_type=z.dtype,
                             precision=_precision(st_spec))
        dc = lax.dot_general(dz_mm, e_blk, (((0,), (0,)), ((), ())), preferred_element_type=z.dtype,
                             precision=_precision(st_spec))
        if d % bd:
          fresh = (d_start + jnp.arange(bd) >= d_first)[None, :]
          de, dc = jnp.where(fresh, de, 0.0), jnp.where(fresh, dc, 0.0)
        _atomic_add(de_ref, (rows_blk, dcols), de)
        _atomic_add(dc_ref, (pl.ds(v_start, bv), dcols), dc)
        return carry

      lax.fori_loop(jnp.int32(0), jnp.int32(pl.cdiv(d, bd)), body, 0)
      if db_ref is not None:
        _atomic_add(db_ref, (pl.ds(v_start, bv),), jnp.sum(dz, axis=0))

    if st_spec.filter_eps is None:
      accumulate()
    else:
      # |dS| / max(|g_lse|, |g_target|, |g_mean|) is |softmax - onehot| for the cross-entropy.
      keep = jnp.max(jnp.abs(ds) * row_vec(inv_r_ref)) >= st_spec.filter_eps
      keep = keep | jnp.isnan(jnp.sum(ds))
      pl.when(keep)(accumulate)

  if keep_ref is None:
    tile()
  else:  # tiles that the forward's bound rules out skip everything, the logit recompute included
    pl.when(keep_ref[i, j] != 0)(tile)


def _dense_bwd(spec, residuals, cotangents):
  """The blockwise XLA backward (dense GEMMs, no atomics; deterministic): exact mode, no filtering, or filtering
  that would keep most tiles."""
  e_ND, c_VD = residuals[0], residuals[1]
  n, v = e_ND.shape[0], c_VD.shape[0]
  xla_spec = dataclasses.replace(spec.stats, config=spec.config.exact_backward_tiles(n, v))
  return xla_chunked.stats_backward(xla_spec, residuals[:6], cotangents)


def _tile_keep_mask(spec, tmax, targets_N, lse, inv_r):
  """[N tiles, V tiles] int32: 0 where no softmax entry of the tile can reach filter_eps and no live row's target
  falls in it (the kernel then skips the tile outright), else 1.

  A bound, never tighter than the kernel's own test: p = exp(s - lse_r) <= exp(tile max - min over the tile's live
  rows of lse_r). NaN anywhere in a tile keeps it, so NaN reaches the gradients."""
  cfg = spec.config
  n = lse.shape[0]
  n_tiles, v_tiles = tmax.shape
  live = inv_r != 0
  tile_of_row = jnp.arange(n) // cfg.block_n
  min_lse = jax.ops.segment_min(jnp.where(live, lse, jnp.inf), tile_of_row, num_segments=n_tiles)
  bad = jax.ops.segment_max((jnp.isnan(lse) | jnp.isnan(inv_r)).astype(jnp.int32), tile_of_row,
                            num_segments=n_tiles)
  keep = ~(tmax - min_lse[:, None] < jnp.log(spec.stats.filter_eps)) | (bad[:, None] != 0)
  target_tile = jnp.clip(targets_N.astype(jnp.int32) // cfg.block_v, 0, v_tiles - 1)
  has_target = jnp.zeros((n_tiles, v_tiles), jnp.bool_).at[tile_of_row, target_tile].max(live)
  return (keep | has_target).astype(jnp.int32)


def _tile_skipping(spec) -> bool:
  """Whether the backward may run the tile-skipping kernel (and so the forward writes tile maxima)."""
  return (spec.stats.filter_eps is not None and not spec.stats.exact
          and spec.config.dense_backward_above > 0.0)


def _stats_bwd(spec, residuals, cotangents):
  if not _tile_skipping(spec):
    return _dense_bwd(spec, residuals, cotangents)
  targets_N, lse, tmax = residuals[3], residuals[4], residuals[6]
  row_cotangents, inv_r = xla_chunked.backward_cotangents(spec.stats, residuals, cotangents)
  keep = _tile_keep_mask(spec, tmax, targets_N, lse, inv_r)
  sparse = lambda: _sparse_bwd(spec, residuals, row_cotangents, inv_r, keep)
  threshold = spec.config.dense_backward_above
  if threshold >= 1.0:
    return sparse()
  return lax.cond(jnp.mean(keep.astype(jnp.float32)) > threshold, lambda: _dense_bwd(spec, residuals, cotangents),
                  sparse)


def _sparse_bwd(spec, residuals, row_cotangents, inv_r, keep):
  """The tile-skipping kernel: kept tiles add their gradients with fp32 atomics."""
  e_ND, c_VD, bias_V, targets_N, lse, mean, _ = residuals
  g_lse, g_st, g_sum, g_mean = row_cotangents
  acc = lse.dtype
  n, d = e_ND.shape
  v = c_VD.shape[0]
  cfg = spec.config
  has_bias = bias_V is not None
  accumulators = [jnp.zeros((n, d), acc), jnp.zeros((v, d), acc)]
  if has_bias:
    accumulators.append(jnp.zeros((v,), acc))
  args = ([e_ND, c_VD] + ([bias_V] if has_bias else [])
          + [targets_N.astype(jnp.int32), lse, mean, g_lse, g_st, g_sum, g_mean, inv_r, keep] + accumulators)
  first_acc = len(args) - len(accumulators)
  grads = pl.pallas_call(
      functools.partial(_bwd_kernel, spec=spec, n=n, v=v, d=d, has_bias=has_bias),
      grid=(pl.cdiv(n, cfg.block_n), pl.cdiv(v, cfg.block_v)),
      in_specs=[pl.no_block_spec] * len(args),
      out_specs=[pl.no_block_spec] * len(accumulators),
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in accumulators],
      input_output_aliases={first_acc + k: k for k in range(len(accumulators))},
      compiler_params=plgpu.CompilerParams(num_warps=cfg.bwd_warps, num_stages=cfg.num_stages),
      interpret=spec.interpret,
      name="cce_bwd",
  )(*args)
  de, dc = grads[0].astype(e_ND.dtype), grads[1].astype(c_VD.dtype)
  db = grads[2].astype(bias_V.dtype) if has_bias else None
  return de, dc, db, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(spec, e_ND, c_VD, bias_V, targets_N):
  return _stats_fwd(spec, e_ND, c_VD, bias_V, targets_N)[0]


_stats.defvjp(_stats_fwd, _stats_bwd)
