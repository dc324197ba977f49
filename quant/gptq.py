"""GPTQ (Frantar et al., 2022; the IST-DASLab algorithm): quantize a layer's weights column by column along the
contraction axis, spreading each column's rounding error over the columns not yet quantized through the inverse of
the layer Hessian `H = 2 XᵀX / n` (see `quant/hessian.py`), so that ‖XW − XŴ‖ is small rather than ‖W − Ŵ‖.

Steps, for w [K, N] (a Flax kernel, [in, out]; K is the contraction axis) and H [K, K]:

1. dead inputs (diag H == 0: the input was always zero in calibration) get H_kk = 1 and w_k = 0;
2. act_order: the inputs are permuted by descending diag H (the most active first); undone at the end;
3. damping: H += damp · mean(diag H) · I; U = the upper Cholesky factor of H⁻¹;
4. columns are visited in lazy blocks of `block_size`: inside a block each column is rounded, its error
   e = (w − ŵ) / U_ii updates the block's later columns (w −= e U_i,·); after the block the error block updates all
   later columns at once (one matrix product);
5. scales follow the format's own rule (`fmt.encode` on the block of weights one scale covers): with
   `group_size=None`/"channel" one scale per output channel from the whole (dead-zeroed) w; with an int g, each
   group's scale from the group's current (already error-updated) weights when the first column of the group is
   reached; with `static_groups=True`, every group's scale from the original w before any update or permutation.

The codes are rounded to the scale's grid exactly like `quantize` (round half to even, clipped), so the result is a
`QArray` with the layout of `quantize(w, fmt, axis=0, group_size=g)`: the same tree structure, aux data and
bits_per_weight, and everything downstream (dot, params, checkpoints) takes it unchanged.

QArray groups are contiguous in the original input order, so act_order with an int group size needs
`static_groups=True` (the IST g_idx of dynamic groups over the permuted order would need gathered scales at inference;
static groups cost nothing at inference).

Cholesky failures. `jnp.linalg.cholesky` returns NaN, not an error, for a matrix that is not positive definite
(a non-PSD H from a bad accumulation, or a singular one that damping does not lift). The factors are checked;
on NaN/Inf the damping is multiplied by 10 and the factorization retried, at most `max_retries` times (3 by default:
damp 0.01 → 0.1 → 1 → 10 times mean(diag H)), each retry with a `UserWarning`; if every attempt fails the layer
falls back to round-to-nearest (`quantize`) with a `UserWarning` naming the layer (`name`). Called eagerly, `gptq`
reads one boolean per attempt on the host; called under `jax.jit` (w or hessian traced), the retries run in a
`lax.while_loop`, the fallback is an elementwise select between the GPTQ and the RTN QArrays (both are computed),
and the same warnings come from a host callback when the computation runs. The factorization and the column sweep
are each one jitted computation. Formats: the integer formats (int8/4/3/2, uint8/4/3); others raise
NotImplementedError.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from cce_jax.quant import qarray
from cce_jax.quant.formats import base
from cce_jax.quant.formats import int as int_formats
from cce_jax.quant.quantize import _blocking, _check_input, quantize as _quantize  # pylint: disable=g-importing-member

_HIGHEST = jax.lax.Precision.HIGHEST


def gptq(w, hessian, fmt, *, group_size=None, act_order: bool = False, static_groups: bool = False,
         damp: float = 0.01, block_size: int = 128, max_retries: int = 3, name: str | None = None) -> qarray.QArray:
  """GPTQ-quantizes the kernel `w` [K, N] (any float dtype, K = inputs) with the Hessian `hessian` [K, K].

  `fmt`: an integer format name or `Format`; `group_size`: None / "channel" (per output channel) or an int g
  dividing K. Computed in float32. Returns a `QArray` laid out as `quantize(w, fmt, axis=0, group_size=group_size)`
  whose `dequantize()` has w's shape and dtype. See the module docstring for the steps and the Cholesky fallback.
  """
  w = jnp.asarray(w)
  hessian = jnp.asarray(hessian, jnp.float32)
  fmt = base.get_format(fmt)
  label = name or "<unnamed layer>"
  if not isinstance(fmt, int_formats.IntFormat):
    raise NotImplementedError(f"gptq supports the integer formats (int8/4/3/2, uint8/4/3), not fmt={fmt.name}")
  if w.ndim != 2:
    raise ValueError(f"gptq expects a 2-D kernel [in, out], got shape {tuple(w.shape)}")
  _check_input(w, 0)
  k, n = w.shape
  if hessian.shape != (k, k):
    raise ValueError(f"gptq: hessian has shape {tuple(hessian.shape)}, expected ({k}, {k}) for w of shape {(k, n)}")
  group, blocked, _ = _blocking(w.shape, 0, group_size, fmt)
  if group not in ("channel",) and not isinstance(group, int):
    raise NotImplementedError(f"gptq supports group_size None, 'channel' or an int, not {group_size!r}")
  g = None if group == "channel" else group
  if act_order and g is not None and not static_groups:
    raise ValueError(f"act_order with group_size={g} needs static_groups=True (QArray groups are contiguous in the "
                     "original input order)")
  if block_size <= 0 or damp < 0 or max_retries < 0:
    raise ValueError(f"gptq: need block_size > 0, damp >= 0, max_retries >= 0; got {block_size=}, {damp=}, "
                     f"{max_retries=}")
  block = min(block_size, k)
  if g is not None:
    block = max(g, block // g * g)  # groups never straddle blocks

  h, dead = _prepare(hessian)
  sweep = functools.partial(_sweep, w.astype(jnp.float32), dead, fmt=fmt, g=g, static_groups=static_groups,
                            block=block)
  assemble = functools.partial(_assemble, fmt=fmt, group=group, shape=tuple(w.shape),
                               dtype=jnp.dtype(w.dtype).name, blocked=tuple(blocked))
  rtn = functools.partial(_quantize, w, fmt, axis=0, group_size=group_size)
  if isinstance(w, jax.core.Tracer) or isinstance(hessian, jax.core.Tracer):
    return _traced(h, sweep, assemble, rtn, damp=damp, act_order=act_order, max_retries=max_retries, label=label)
  for attempt in range(max_retries + 1):
    factor, perm = _inverse_cholesky(h, jnp.float32(damp * 10.0 ** attempt), act_order)
    if bool(jnp.all(jnp.isfinite(factor))):
      return assemble(*sweep(factor, perm))
    if attempt < max_retries:
      _warn_retry(label, damp * 10.0 ** attempt)
  _warn_fallback(label, damp, max_retries)
  return rtn()


def _warn_retry(label, d):
  warnings.warn(f"gptq({label}): Cholesky of the damped Hessian failed at damp={d:g}; retrying with damp={d * 10:g}",
                UserWarning, stacklevel=3)


def _warn_fallback(label, damp, max_retries):
  warnings.warn(f"gptq({label}): the Hessian is not positive definite even at damp={damp * 10.0 ** max_retries:g} "
                f"after {max_retries} retries; falling back to round-to-nearest for this layer",
                UserWarning, stacklevel=3)


def _traced(h, sweep, assemble, rtn, *, damp, act_order, max_retries, label):
  """`gptq` under an outer jit: the retries run in a while_loop, the fallback is a select between the GPTQ and the
  RTN QArrays (same layout), and the warnings are raised from a host callback when the computation runs."""
  factor, perm = _inverse_cholesky(h, jnp.float32(damp), act_order)
  failed = lambda f: jnp.logical_not(jnp.all(jnp.isfinite(f)))

  def retry(carry):
    attempt, _ = carry
    return attempt + 1, _inverse_cholesky(h, damp * jnp.float32(10.0) ** (attempt + 1), act_order)[0]

  attempt, factor = jax.lax.while_loop(lambda c: (c[0] < max_retries) & failed(c[1]), retry, (0, factor))
  ok = jnp.logical_not(failed(factor))

  def report(attempt, ok):
    for a in range(int(attempt)):
      _warn_retry(label, damp * 10.0 ** a)
    if not ok:
      _warn_fallback(label, damp, max_retries)

  jax.debug.callback(report, attempt, ok)
  q, r = assemble(*sweep(factor, perm)), rtn()
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), q, r)


def _assemble(codes_nk, scales, zeros, *, fmt, group, shape, dtype, blocked):
  """The QArray of `quantize`'s layout from the sweep's codes [N, K] (stored form), scales and zero points."""
  return qarray.QArray(
      values=qarray.pack(codes_nk.reshape(blocked), fmt.container_bits), scales=scales,
      zero_points=None if fmt.signed else zeros.astype(jnp.uint8), scale2=None, fmt=fmt, axis=0,
      group_size=group, shape=shape, dtype=dtype, blocked_shape=blocked)


@jax.jit
def _prepare(h):
  """(H with dead inputs' diagonal set to 1, the dead mask [K] bool)."""
  diag = jnp.diagonal(h)
  dead = diag == 0
  return h + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(h.dtype)), dead


@functools.partial(jax.jit, static_argnums=(2,))
def _inverse_cholesky(h, damp, act_order):
  """(U: upper Cholesky factor of (P H Pᵀ + damp·mean(diag H)·I)⁻¹ (NaN where it fails), the permutation P [K])."""
  k = h.shape[0]
  diag = jnp.diagonal(h)
  perm = jnp.argsort(-diag, stable=True) if act_order else jnp.arange(k)
  h = h[perm][:, perm]
  h = h + jnp.eye(k, dtype=h.dtype) * (damp * jnp.mean(diag))
  lower = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=h.dtype))
  return jnp.linalg.cholesky(hinv).T, perm


def _round(fmt, w_n, s_n, z_n):
  """(uint8 codes as `quantize` stores them, dequantized values) of one column on the grid of scales s (zeros z)."""
  if fmt.signed:
    q = jnp.clip(jnp.round(w_n / s_n), fmt.qmin, fmt.qmax)
    return (q - fmt.qmin).astype(jnp.uint8), q * s_n
  q = jnp.clip(jnp.round(w_n / s_n) + z_n, 0, fmt.qmax)
  return q.astype(jnp.uint8), (q - z_n) * s_n


def _scales(fmt, w_nxg):
  """The format's (scales, zero points) for blocks along the last axis: shapes w.shape[:-1] + (1,) (zeros 0 if
  the format is symmetric)."""
  enc = fmt.encode(w_nxg, (w_nxg.ndim - 1,))
  zeros = enc.zero_points if enc.zero_points is not None else jnp.zeros_like(enc.scales)
  return enc.scales, zeros.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("fmt", "g", "static_groups", "block"))
def _sweep(w_kn, dead, u, perm, *, fmt, g, static_groups, block):
  """The column sweep. Returns (codes [N, K] uint8 in the original order, scales, zero points) with scales laid out
  as `quantize`'s: [N, 1] per channel or [N, K/g, 1] per group."""
  k, n = w_kn.shape
  w_nk = jnp.where(dead[None, :], 0.0, w_kn.T)
  dynamic = g is not None and not static_groups
  if g is None:
    scales, zeros = _scales(fmt, w_nk)                                   # [N, 1]
    s_cols = jnp.broadcast_to(scales, (n, k))
    z_cols = jnp.broadcast_to(zeros, (n, k))
  elif static_groups:
    scales, zeros = _scales(fmt, w_nk.reshape(n, k // g, g))             # [N, K/g, 1]
    s_cols = scales[:, perm // g, 0]                                     # the original group of each permuted column
    z_cols = zeros[:, perm // g, 0]
  else:
    s_cols = z_cols = jnp.ones((n, k), jnp.float32)                      # filled in as the groups are reached
  w_nk = w_nk[:, perm]

  kp = -(-k // block) * block                                            # pad to whole blocks: zero weights,
  pad = kp - k                                                           # identity factor, no coupling
  w_nk = jnp.pad(w_nk, ((0, 0), (0, pad)))
  u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.concatenate([jnp.zeros(k), jnp.ones(pad)]))
  s_cols = jnp.pad(s_cols, ((0, 0), (0, pad)), constant_values=1.0)
  z_cols = jnp.pad(z_cols, ((0, 0), (0, pad)))

  def column(i, carry):
    w1, err1, codes1, s1, z1, i1, sc, zc = carry
    if dynamic:
      def new_group(_):
        s, z = _scales(fmt, jax.lax.dynamic_slice_in_dim(w1, i, g, axis=1))
        return s[:, 0], z[:, 0]
      sc, zc = jax.lax.cond(i % g == 0, new_group, lambda _: (sc, zc), None)
    else:
      sc, zc = s1[:, i], z1[:, i]
    u_row = jax.lax.dynamic_slice(u, (i1 + i, i1), (1, block))[0]       # U[i1+i, i1:i1+B]; zero left of i
    w_col = w1[:, i]
    code, deq = _round(fmt, w_col, sc, zc)
    e = (w_col - deq) / u_row[i]
    w1 = w1 - e[:, None] * u_row[None, :]
    return (w1, err1.at[:, i].set(e), codes1.at[:, i].set(code), s1.at[:, i].set(sc), z1.at[:, i].set(zc),
            i1, sc, zc)

  def one_block(b, carry):
    w, codes, s_cols, z_cols, sc, zc = carry
    i1 = b * block
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, block, axis=1)
    init = (w1, jnp.zeros_like(w1), jnp.zeros(w1.shape, jnp.uint8),
            jax.lax.dynamic_slice_in_dim(s_cols, i1, block, axis=1),
            jax.lax.dynamic_slice_in_dim(z_cols, i1, block, axis=1), i1, sc, zc)
    _, err1, codes1, s1, z1, _, sc, zc = jax.lax.fori_loop(0, block, column, init)
    rows = jax.lax.dynamic_slice_in_dim(u, i1, block, axis=0)            # U[i1:i1+B, :]; zero left of i1
    col_idx = jnp.arange(kp)
    later = col_idx >= i1 + block                                        # the block's own columns are final
    w = w - jnp.where(later[None, :], jnp.dot(err1, rows, precision=_HIGHEST), 0.0)
    codes = jax.lax.dynamic_update_slice_in_dim(codes, codes1, i1, axis=1)
    s_cols = jax.lax.dynamic_update_slice_in_dim(s_cols, s1, i1, axis=1)
    z_cols = jax.lax.dynamic_update_slice_in_dim(z_cols, z1, i1, axis=1)
    return w, codes, s_cols, z_cols, sc, zc

  init = (w_nk, jnp.zeros((n, kp), jnp.uint8), s_cols, z_cols, jnp.ones((n,), jnp.float32),
          jnp.zeros((n,), jnp.float32))
  _, codes, s_cols, z_cols, _, _ = jax.lax.fori_loop(0, kp // block, one_block, init)
  inverse = jnp.argsort(perm)
  codes = codes[:, :k][:, inverse]
  if g is None:
    return codes, scales, zeros
  if static_groups:
    return codes, scales, zeros
  return codes, s_cols[:, :k:g, None], z_cols[:, :k:g, None]
