"""AWQ (activation-aware weight quantization, Lin et al. 2023) for one linear layer: scale search, then clip search.

The math follows mit-han-lab/llm-awq (`auto_scale.py`, `auto_clip.py`). For a kernel W [in, out] (Flax layout,
contraction axis 0) fed by activations x [N, in]:

1. Scale search. With m_j = mean_n |x_nj| (per input channel) and α ∈ {0, 1/grid, …, (grid−1)/grid},
   s(α) = max(m^α, 1e-4), normalised by sqrt(max s · min s). The loss of α is the output MSE
   mean((x / s) @ Q(W·s) − x @ W)², where Q is round-to-nearest `fake_quantize(·, fmt, axis=0, group_size=g)`.
   Several kernels that read the same input (q/k/v, gate/up) are scored jointly: their squared errors are summed
   over all their outputs and divided by the total output count. The α of least loss wins (the first on ties, so
   α = 0, s = 1, is plain RTN).
2. Clip search (on W·s and x / s). On a strided token subsample (every ⌈N / 512⌉-th token, at most 512), for each
   output channel and group of g input channels, the shrink ratio r ∈ {1.0, 0.95, …, 0.55} (llm-awq's
   n_grid=20, max_shrink=0.5) that minimises that group's partial-output MSE
   mean_n (x_g · (w_g − Q(clip(w_g, ±r·max|w_g|))))² is kept; W·s is clipped to ±r·max|w_g| per group. r = 1
   leaves the group unchanged, so the sum of the per-group errors never exceeds RTN's.

The result is `quantize(clip(W·s), fmt, axis=0, group_size=group_size)`: the same format and layout as RTN. The
scale s must be folded into the op that produces x (x ← x / s; `fold_scale`, below) so that
(x / s) @ (W·s) = x @ W in full precision.

Dtypes: any float inputs; all search math in float32 with HIGHEST matmul precision; s is float32 [in]; the
QArray keeps W's dtype.

Folding (`fold_scale`, `scale_input`). A scale s over the input channels of the next kernels W is exact in full
precision when the producer of x divides its output channels by s and W's input rows are multiplied by s:

- RMSNorm → q/k/v and RMSNorm → gate/up (w1, w3): norm.scale / s (s [D]), wq, wk, wv (or w1, w3) · s on axis 0;
- up → down: w3[:, f] / s_f (the SwiGLU product silu(x w1) · (x w3) is linear in x w3), w2 · s on axis 0 (s [F]);
- v → o, only without grouped-query attention (KV == H): wv [D, H, K] / s over (H, K), wo [H, K, D] · s on its
  leading (H, K) axes (s [H·K]). With KV < H each v channel feeds H / KV heads of o, so one scale would have to
  serve all of them; like llm-awq, that fold is not offered.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.quant.quantize import fake_quantize, quantize
from cce_jax.quant.formats import base

CLIP_TOKENS = 512
"""The clip search's token subsample is at most this many (strided) tokens."""
CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(10))
"""Shrink ratios of the clip search: 1.0, 0.95, …, 0.55."""

_HI = jax.lax.Precision.HIGHEST


def _group_length(fmt: base.Format, group_size, n_in: int) -> int:
  """The number of consecutive input channels that share one scale (`quantize`'s grouping along axis 0)."""
  g = fmt.default_group if group_size is None else group_size
  if g == "channel":
    return n_in
  if isinstance(g, (int, np.integer)) and not isinstance(g, bool):
    if g <= 0 or n_in % g:
      raise ValueError(f"awq: group_size={g} must divide the input size {n_in} (axis 0 of w)")
    return int(g)
  raise ValueError(f"awq takes group_size None, 'channel' or an int, got {g!r}")


def _check(ws, x, act_mean, grid):
  n_in = ws[0].shape[0]
  for w in ws:
    if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):
      raise ValueError(f"awq: w must be a float kernel [in, out, ...], got shape {tuple(w.shape)} dtype {w.dtype}")
    if w.shape[0] != n_in:
      raise ValueError(f"awq: kernels sharing one input must agree on axis 0, got shapes "
                       f"{[tuple(v.shape) for v in ws]}")
  if x.ndim < 1 or x.shape[-1] != n_in or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"awq: x must be float [..., {n_in}] (w's input size), got shape {tuple(x.shape)} dtype "
                     f"{x.dtype}")
  if act_mean is not None and tuple(act_mean.shape) != (n_in,):
    raise ValueError(f"awq: act_mean must have shape ({n_in},), got {tuple(act_mean.shape)}")
  if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
    raise ValueError(f"awq: grid must be a positive int, got {grid!r}")


def awq_scales(act_mean, alpha):
  """s = max(act_mean^α, 1e-4) / sqrt(max s · min s): float32 [in] from act_mean float [in] and a scalar α."""
  s = jnp.maximum(jnp.asarray(act_mean, jnp.float32) ** alpha, 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "grid"))
def _scale_losses(ws, x, act_mean, fmt, group_size, grid):
  refs = [jnp.matmul(x, w, precision=_HI) for w in ws]
  count = sum(r.size for r in refs)

  def loss(alpha):
    s = awq_scales(act_mean, alpha)
    xs = x / s
    err = jnp.float32(0.0)
    for w, ref in zip(ws, refs):
      q = fake_quantize(w * s[:, None], fmt, axis=0, group_size=group_size)
      err = err + jnp.sum(jnp.square(jnp.matmul(xs, q, precision=_HI) - ref))
    return err / count

  return jax.lax.map(loss, jnp.arange(grid, dtype=jnp.float32) / grid)


def scale_search_losses(w, x, fmt, *, group_size=128, grid: int = 20, act_mean=None):
  """The AWQ scale-search loss for each α = i / grid, i < grid (module docstring): float32 [grid].

  w: a float kernel [in, ...] (or a list of kernels with the same `in`) with contraction axis 0; x: float
  [..., in]; act_mean: per-channel mean |x| [in] if accumulated over more tokens than x holds (default: from x).
  """
  ws = list(w) if isinstance(w, (list, tuple)) else [w]
  ws = [jnp.asarray(v) for v in ws]
  x = jnp.asarray(x)
  fmt = base.get_format(fmt)
  _check(ws, x, act_mean, grid)
  _group_length(fmt, group_size, ws[0].shape[0])
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  m = jnp.mean(jnp.abs(x2), axis=0) if act_mean is None else jnp.asarray(act_mean, jnp.float32)
  ws2 = tuple(v.reshape(v.shape[0], -1).astype(jnp.float32) for v in ws)
  return _scale_losses(ws2, x2, m, fmt, group_size, grid)


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "g"))
def _clip(w, x_sub, fmt, group_size, g):
  """w [in, O] float32 clipped per (group, output channel) at the ratio of least partial-output MSE."""
  n_in, n_out = w.shape
  wg = w.reshape(n_in // g, g, n_out)
  xg = x_sub.reshape(x_sub.shape[0], n_in // g, g)
  amax = jnp.max(jnp.abs(wg), axis=1, keepdims=True)
  ratios = jnp.asarray(CLIP_RATIOS, jnp.float32)

  def err(r):
    q = fake_quantize(jnp.clip(wg, -r * amax, r * amax).reshape(n_in, n_out), fmt, axis=0,
                                   group_size=group_size)
    d = jnp.einsum("ngk,gko->ngo", xg, wg - q.reshape(wg.shape), precision=_HI)
    return jnp.mean(jnp.square(d), axis=0)  # [G, O]

  best = jnp.argmin(jax.lax.map(err, ratios), axis=0)  # first minimum: r = 1 wins ties
  limit = amax * ratios[best][:, None, :]
  return jnp.clip(wg, -limit, limit).reshape(n_in, n_out)


def clip_subsample(x, n_tokens: int = CLIP_TOKENS):
  """Every ⌈N / n_tokens⌉-th row of x reshaped to [N, in]: at most n_tokens rows (float32)."""
  x2 = jnp.asarray(x).reshape(-1, x.shape[-1]).astype(jnp.float32)
  return x2[::max(1, math.ceil(x2.shape[0] / n_tokens))]


def _split(shape, n: int, leading: bool) -> int:
  """How many leading (or trailing) axes of `shape` hold n elements: the fewest ≥ 1; ValueError if none."""
  for k in range(1, len(shape) + 1):
    if math.prod(shape[:k] if leading else shape[len(shape) - k:]) == n:
      return k
  side = "leading" if leading else "trailing"
  raise ValueError(f"a scale of {n} elements matches no {side} axes of an array with shape {tuple(shape)}")


def fold_scale(prev, s):
  """The producer's parameter with its output channels divided by s: prev / s over its trailing axes.

  prev: an RMSNorm scale [D], or a kernel whose trailing axes produce x (w3 [D, F], wv [D, H, K]); s: float [n]
  with n the product of those trailing axes (the fewest that match). Same shape and dtype as prev (fp32 math).
  """
  prev = jnp.asarray(prev)
  s = jnp.asarray(s, jnp.float32).reshape(-1)
  k = _split(prev.shape, s.size, leading=False)
  return (prev.astype(jnp.float32) / s.reshape(prev.shape[prev.ndim - k:])).astype(prev.dtype)


def scale_input(w, s):
  """The consuming kernel with its input rows multiplied by s: w · s over its leading axes (wo [H, K, D]: H, K).

  Same shape and dtype as w (fp32 math). `awq` already returns the quantized w · s; this is the full-precision
  counterpart (for checks and for SmoothQuant).
  """
  w = jnp.asarray(w)
  s = jnp.asarray(s, jnp.float32).reshape(-1)
  k = _split(w.shape, s.size, leading=True)
  return (w.astype(jnp.float32) * s.reshape(w.shape[:k] + (1,) * (w.ndim - k))).astype(w.dtype)


def awq(w, x, fmt, *, group_size=128, grid: int = 20, clip: bool = True, act_mean=None):
  """AWQ of a kernel (or kernels sharing one input) into `fmt`: returns (s, QArray) (or (s, [QArray, ...])).

  Args:
    w: float kernel [in, ...] with contraction axis 0 (Flax layout: wq [D, H, K], w1 [D, F]; pass wo [H, K, D]
      reshaped to [H·K, D]), or a list/tuple of kernels with the same `in` scored jointly (q/k/v, gate/up).
    x: float activations [..., in] that feed w (a calibration sample; the scale search uses every row).
    fmt: a format name or `Format`.
    group_size: as `quantize`'s along axis 0: an int dividing `in`, "channel", or None (the format's default).
    grid: the scale search tries α = i / grid for i < grid (grid=1: α = 0 only, i.e. s = 1).
    clip: run the clip search after the scale search.
    act_mean: optional per-channel mean |x| [in] accumulated over a longer calibration stream than x.

  Returns:
    s: float32 [in], to fold into the op producing x (x / s); the quantized kernels hold clip(W·s).
    The QArray(s) of `quantize(clip(w·s), fmt, axis=0, group_size=group_size)`, in w's shape and dtype.
  """
  ws = list(w) if isinstance(w, (list, tuple)) else [w]
  ws = [jnp.asarray(v) for v in ws]
  fmt = base.get_format(fmt)
  losses = scale_search_losses(ws, x, fmt, group_size=group_size, grid=grid, act_mean=act_mean)
  x2 = jnp.asarray(x).reshape(-1, x.shape[-1]).astype(jnp.float32)
  m = jnp.mean(jnp.abs(x2), axis=0) if act_mean is None else jnp.asarray(act_mean, jnp.float32)
  s = awq_scales(m, jnp.argmin(losses).astype(jnp.float32) / grid)
  g = _group_length(fmt, group_size, ws[0].shape[0])
  x_sub = clip_subsample(x2 / s) if clip else None
  out = []
  for v in ws:
    ws2 = v.reshape(v.shape[0], -1).astype(jnp.float32) * s[:, None]
    if clip:
      ws2 = _clip(ws2, x_sub, fmt, group_size, g)
    out.append(quantize(ws2.reshape(v.shape).astype(v.dtype), fmt, axis=0, group_size=group_size))
  return s, (out if isinstance(w, (list, tuple)) else out[0])


