"""LLM-FP4-style searched low-bit float formats per layer: `fp_search(w, x) -> QArray`.

LLM-FP4 (Liu et al. 2023) quantizes each layer into the b-bit float format whose exponent/mantissa split and
exponent bias (equivalently its clipping maximum) minimise the layer's output error on calibration inputs. Here:

- Search space: the exponent width E ∈ {1, …, b−1} (4 bits: e1m2, e2m1, e3m0; M = b − 1 − E) × the clipping ratio
  c ∈ `formats.fpx.CLIPS` (1.0, 0.95, …, 0.55): 30 candidates at 4 bits. Each candidate is quantized with the
  scale rule of `formats.fpx` (an e4m3 scale per block of `group_size` along the input axis, an fp32 scale per
  tensor; the block maximum maps to max / c). Under a real-valued scale, LLM-FP4's exponent bias is a power-of-two
  factor of the scale, so the bias search is the clipping-maximum search.
- Loss: ‖XW − XŴ‖² summed over the calibration tokens (x [n, K]), or Σ Eᵀ H E with a Hessian H ∝ XᵀX (the
  accumulated `quant.hessian_update` state: all calibration tokens in [K, K]), E = Ŵ − W.
- Choice: one split per layer (LLM-FP4's per-layer format) and, with `clip_per="layer"` (default), one clip ratio
  per layer; `clip_per="channel"` picks the clip ratio per output channel (the output error is a sum over output
  channels, so this is the exact per-channel minimum for the chosen split; free in storage: c multiplies that
  channel's block scales). The candidate (e2m1, c = 1) comes first and ties keep it, so the searched format's loss
  is never above plain e2m1's (`fp{b}_e2m1` with the same blocks) on the calibration data.

Cost: the candidates are evaluated vectorized (`jax.lax.map` in batches of about 2^25 weight elements), each one
quantize-dequantize plus one [n, K] × [K, N] (or [K, K] × [K, N]) product; the whole function is jit-able (the
chosen split is data: it is stored in the QArray's `scale2`, and the format is `fp{b}_search`). The result is
laid out as `quantize(w, "fp{b}_search", axis=0, group_size=group_size)`: b + 8/group_size bits per weight plus
64 bits per tensor (the tensor scale and the exponent width).

Activations: `fp_search_activations(x, w)` searches the split and clip ratio of a layer's input format (per-token
or per-tensor dynamic scales) on ‖(Q(x) − x) W‖² and returns a concrete format for `quantize_model(act_quant=...)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.quant import qarray
from cce_jax.quant.formats import base
from cce_jax.quant.formats import fpx
from cce_jax.quant.quantize import _blocking

CLIP_PER = ("layer", "channel")


def _check(w, x, hessian, bits, group_size, splits, clips, clip_per):
  """Validates the arguments (one-line errors); returns the normalised (splits, clips, group)."""
  if not jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating) or jnp.ndim(w) != 2:
    raise ValueError(f"fp_search expects a float kernel w [K, N], got shape {jnp.shape(w)} dtype "
                     f"{jnp.asarray(w).dtype}")
  k = w.shape[0]
  if (x is None) == (hessian is None):
    raise ValueError("fp_search needs exactly one of x [n, K] (calibration inputs) and hessian [K, K]")
  if x is not None and (jnp.ndim(x) != 2 or x.shape[1] != k):
    raise ValueError(f"x must be [n, {k}] (calibration inputs of w [{k}, {w.shape[1]}]), got shape {jnp.shape(x)}")
  if hessian is not None and jnp.shape(hessian) != (k, k):
    raise ValueError(f"hessian must be [{k}, {k}] for w [{k}, {w.shape[1]}], got shape {jnp.shape(hessian)}")
  if bits not in fpx.BITS:
    raise ValueError(f"bits must be one of {fpx.BITS}, got {bits}")
  splits = fpx.default_splits(bits, None) if splits is None else tuple(int(e) for e in splits)
  if not splits or any(not 1 <= e <= bits - 1 for e in splits):
    raise ValueError(f"splits must be exponent widths in 1..{bits - 1} for {bits}-bit floats, got {splits}")
  clips = tuple(float(c) for c in clips)
  if not clips or any(not 0.0 < c <= 1.0 for c in clips):
    raise ValueError(f"clips must be ratios in (0, 1], got {clips}")
  if clip_per not in CLIP_PER:
    raise ValueError(f"clip_per must be one of {CLIP_PER}, got {clip_per!r}")
  for name, a in (("w", w), ("x", x), ("hessian", hessian)):
    if a is not None and not isinstance(a, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(a))):
      raise ValueError(f"{name} (shape {tuple(jnp.shape(a))}) contains NaN or Inf")
  return splits, clips


def fp_search(w, x=None, *, bits: int = 4, group_size=32, hessian=None, splits=None, clips=fpx.CLIPS,
              clip_per: str = "layer") -> qarray.QArray:
  """The kernel `w` [K, N] in the searched `bits`-bit float format minimising ‖XW − XŴ‖² (module docstring).

  Args:
    w: float [K, N] kernel (input axis first, Flax `Dense` layout).
    x: float [n, K] calibration inputs; or None with `hessian` [K, K] (∝ XᵀX) instead.
    bits: 3 … 6 (total bits of the element, sign included).
    group_size: block length along K (an int dividing K, or "channel"); the e4m3 block scales run along it.
    hessian: float [K, K], used when x is None.
    splits: exponent widths to search (default all of 1 … bits−1, e2 first).
    clips: clipping ratios to search (default `formats.fpx.CLIPS`).
    clip_per: "layer" (one ratio) or "channel" (one ratio per output channel).

  Returns a `QArray` of format `fp{bits}_search`, shape and dtype of w; `fp_choice(q)` gives the chosen split.
  """
  splits, clips = _check(w, x, hessian, bits, group_size, splits, clips, clip_per)
  w = jnp.asarray(w)
  fmt = base.get_format(f"fp{bits}_search")
  group, blocked, reduce_axes = _blocking(w.shape, 0, group_size, fmt)
  h = None if hessian is None else jnp.asarray(hessian, jnp.float32)
  xx = None if x is None else jnp.asarray(x, jnp.float32)
  enc, _ = _search(w.astype(jnp.float32), xx, h, bits=bits, blocked=blocked, reduce_axes=reduce_axes,
                   splits=splits, clips=clips, clip_per=clip_per)
  return qarray.QArray(values=qarray.pack(enc.codes, fmt.container_bits), scales=enc.scales, zero_points=None,
                       scale2=enc.scale2, fmt=fmt, axis=0, group_size=group, shape=tuple(w.shape),
                       dtype=jnp.dtype(w.dtype).name, blocked_shape=tuple(blocked))


def fp_search_losses(w, x=None, *, bits: int = 4, group_size=32, hessian=None, splits=None, clips=fpx.CLIPS):
  """float32 [S, C, N]: the output error of every candidate (split s, clip c) per output channel n."""
  splits, clips = _check(w, x, hessian, bits, group_size, splits, clips, "layer")
  w = jnp.asarray(w)
  fmt = base.get_format(f"fp{bits}_search")
  _, blocked, reduce_axes = _blocking(w.shape, 0, group_size, fmt)
  h = None if hessian is None else jnp.asarray(hessian, jnp.float32)
  xx = None if x is None else jnp.asarray(x, jnp.float32)
  return _search(w.astype(jnp.float32), xx, h, bits=bits, blocked=blocked, reduce_axes=reduce_axes,
                 splits=splits, clips=clips, clip_per="layer")[1]


GRANULARITIES = ("token", "tensor")


def fp_search_activations(x, w, *, bits: int = 8, granularity: str = "token", splits=None, clips=fpx.CLIPS):
  """(the `FPFormat` for the activations x feeding w, losses [S, C]): LLM-FP4's activation-format search.

  Each candidate (split E, clip c) quantizes x [n, K] with `formats.fpx`'s rule, one e4m3 scale per token
  (`granularity="token"`, over K) or one for all of x ("tensor"), under an fp32 scale per tensor (dynamic: computed
  from the activations at inference, as `dot.fake_quantize_activations` does); the loss is ‖(Q(x) − x) W‖² over
  the tokens, W [K, N] the (full-precision or dequantized) kernel. The losses are computed in one jitted,
  vectorized pass; the chosen format is static (a concrete `FPFormat` with `ebits` and `clip` set), to use as
  `quantize_model(..., act_quant=(fmt, granularity))` or `dot.fake_quantize_activations(spec, x, fmt, granularity)`.
  The first candidate is (E = 2 at b ≤ 4, else ⌊(b − 1)/2⌋ + 1: e4m3 at 8 bits; c = 1) and ties keep it.
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
  w = jnp.asarray(w)
  if jnp.ndim(x) != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"fp_search_activations expects x [n, K] and w [K, N], got {jnp.shape(x)} and {w.shape}")
  if bits not in fpx.BITS:
    raise ValueError(f"bits must be one of {fpx.BITS}, got {bits}")
  if splits is None:
    splits = tuple(sorted(range(1, bits), key=lambda e: (abs(e - (2 if bits <= 4 else (bits - 1) // 2 + 1)), e)))
  splits, clips = _check(w, jnp.zeros((1, w.shape[0])), None, bits, "channel", splits, clips, "layer")
  xx = jnp.asarray(x, jnp.float32)
  if not isinstance(xx, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(xx))):
    raise ValueError(f"x (shape {tuple(xx.shape)}) contains NaN or Inf")
  reduce_axes = (1,) if granularity == "token" else (0, 1)
  losses = _act_losses(xx, w.astype(jnp.float32), bits=bits, reduce_axes=reduce_axes, splits=splits, clips=clips)
  s_i, c_i = np.unravel_index(int(jnp.argmin(losses)), losses.shape)
  e = splits[s_i]
  fmt = fpx.FPFormat(f"fp{bits}_e{e}m{bits - 1 - e}", bits=bits, ebits=e, clip=clips[c_i])
  return fmt, losses


@functools.partial(jax.jit, static_argnames=("bits", "reduce_axes", "splits", "clips"))
def _act_losses(x, w, *, bits, reduce_axes, splits, clips):
  es, cs = fpx.candidates(bits, splits, clips)

  def loss(ec):
    r, b, g = fpx.encode_blocks(x, reduce_axes, bits, ec[0], ec[1])
    return jnp.sum(jnp.square(jnp.matmul(r * b * g - x, w, precision=jax.lax.Precision.HIGHEST)))

  size = x.size + x.shape[0] * w.shape[1]
  losses = jax.lax.map(loss, (es, cs), batch_size=max(1, min(len(es), (1 << 25) // size)))
  return losses.reshape(len(splits), len(clips))


def search_space(fmt) -> dict:
  """fp_search's `bits`, `splits` and `clips` for an `FPFormat`: its None fields are searched, the others fixed.

  `fp4_search` searches both; `get_format("fp4_search", clip=1.0)` only the split (absmax scaling).
  """
  fmt = base.get_format(fmt)
  if not isinstance(fmt, fpx.FPFormat):
    raise ValueError(f"fp_search takes an fp{{b}}_e*m* or fp{{b}}_search format, got {fmt.name}")
  return {"bits": fmt.bits, "splits": None if fmt.ebits is None else (fmt.ebits,),
          "clips": fpx.CLIPS if fmt.clip is None else (fmt.clip,)}


def fp_choice(q: qarray.QArray) -> tuple[str, np.ndarray]:
  """(the chosen element format, e.g. "e3m0"; the per-block scales' float32 values) of a concrete searched QArray."""
  e = int(np.asarray(q.scale2)[1])
  return f"e{e}m{q.fmt.bits - 1 - e}", np.asarray(q.scales.astype(jnp.float32))


def _fake_2d(wb, reduce_axes, bits, ebits, clip, k, n):
  """The dequantized candidate as [K, N] from blocked w [N, …]."""
  r, b, g = fpx.encode_blocks(wb, reduce_axes, bits, ebits, clip)
  return (r * b * g).reshape(n, k).T


@functools.partial(jax.jit, static_argnames=("bits", "blocked", "reduce_axes", "splits", "clips", "clip_per"))
def _search(w, x, h, *, bits, blocked, reduce_axes, splits, clips, clip_per):
  """(Encoded of the chosen candidate, losses [S, C, N]) for float32 w [K, N]."""
  k, n = w.shape
  wb = w.T.reshape(blocked)
  es, cs = fpx.candidates(bits, splits, clips)
  hi = jax.lax.Precision.HIGHEST

  def loss(ec):
    err = _fake_2d(wb, reduce_axes, bits, ec[0], ec[1], k, n) - w
    if x is not None:
      return jnp.sum(jnp.square(jnp.matmul(x, err, precision=hi)), axis=0)
    return jnp.sum(err * jnp.matmul(h, err, precision=hi), axis=0)

  size = k * n + (x.shape[0] * n if x is not None else k * n)
  losses = jax.lax.map(loss, (es, cs), batch_size=max(1, min(len(es), (1 << 25) // size)))
  losses = losses.reshape(len(splits), len(clips), n)
  clip_arr = jnp.asarray(clips, jnp.float32)
  if clip_per == "layer":
    i = jnp.argmin(jnp.sum(losses, axis=-1).reshape(-1))
    s_i, clip = i // len(clips), clip_arr[i % len(clips)]
  else:
    s_i = jnp.argmin(jnp.sum(jnp.min(losses, axis=1), axis=-1))
    clip = clip_arr[jnp.argmin(losses[s_i], axis=0)]  # [N]
    clip = clip.reshape((n,) + (1,) * (len(blocked) - 1))
  ebits = jnp.asarray(splits, jnp.int32)[s_i]
  return fpx.encoded(wb, reduce_axes, bits, ebits, clip), losses
