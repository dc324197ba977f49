"""Dots against weights that may be quantized: the decoder reads every parameter through `read` or `einsum`.

A weight `w` is an array, a `QArray`, or an `nnx.Variable` holding either.

- `read(w, dtype=None)`: the weight as an array in `dtype` (None: its stored or original dtype). A QArray is
  dequantized here, inside the caller's jit, so only its packed codes and scales are kept between calls; the
  full-precision copy is a temporary of the forward.
- `einsum(spec, x, w, *, dtype)`: `jnp.einsum(spec, x, read(w, dtype))` in the compute dtype `dtype`, or
  `native_einsum` when `w` is a Variable whose metadata says `native_dot=True` (`quantize_model(...,
  native_dots=True)` sets it). When the Variable's metadata holds `act_quant=(Format, "token" | "tensor")`
  (`quantize_model(..., act_quant=...)`), x is first fake-quantized into that format (`fake_quantize_activations`:
  W8A8 as dequantized operands and a float matmul).
- `fake_quantize_activations(spec, x, fmt, granularity)`: x quantized and dequantized with dynamic scales, one per
  token (over the axes of x that `spec` contracts) or one for the whole tensor x, by the format's own rounding.
- `native_einsum(spec, x, q)`: W8A8 with per-token dynamic activation scales. x is quantized per token (one scale
  over the contracted axes of each row of x) into q's format by that format's own rounding rule, the codes are
  multiplied as fp8_e4m3 × fp8_e4m3 (float32 accumulation) or int8 × int8 (int32 accumulation, exact) by
  `jax.lax.dot_general`, and the product is rescaled by the token's and the output channel's scales (float32);
  the result is float32. It takes `int8` or `fp8_e4m3` QArrays with one scale per output channel
  (group_size="channel"). Whether XLA runs such a dot as a native fp8 / int8 GEMM depends on the device:
  `benchmarks/quant/native_dots.py` checks the compiled HLO and times it.

`spec` names two operands and the output explicitly ("btd,dhk->bthk"); the weight's letters are contracted
letters (also in x) and output letters (not in x). For a QArray whose per-channel scales vary along a contracted
letter other than its `axis` (`wo` [H, head_dim, D] blocked along head_dim), that letter becomes a batch axis of
the dot, and the per-head products are rescaled before they are summed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cce_jax.quant import qarray
from cce_jax.quant.formats import base
from cce_jax.quant.formats import int as int_format

NATIVE_FORMATS = ("int8", "fp8_e4m3")
"""Formats `native_einsum` multiplies in: weights and activations both in it."""

ACT_GRANULARITIES = ("token", "tensor")
"""Activation scales of `fake_quantize_activations`: one per token, or one per tensor (both dynamic)."""


def _value(w):
  if isinstance(w, nnx.Variable):
    return w.get_value() if hasattr(w, "get_value") else w.value
  return w


def read(w, dtype=None):
  """`w` (array, QArray, or a Variable holding either) as an array of its own shape in `dtype` (None: its own)."""
  w = _value(w)
  if isinstance(w, qarray.QArray):
    w = w.dequantize()
  return w if dtype is None else w.astype(dtype)


def is_native(w) -> bool:
  """Whether `w` is a Variable marked for `native_einsum` (metadata `native_dot=True`) holding a QArray."""
  return (isinstance(w, nnx.Variable) and bool(w.get_metadata().get("native_dot", False))
          and isinstance(_value(w), qarray.QArray))


def einsum(spec: str, x, w, *, dtype):
  """`spec` contraction of activations x with the weight w (module docstring), returned in `dtype`."""
  if is_native(w):
    return native_einsum(spec, x.astype(dtype), _value(w)).astype(dtype)
  act = w.get_metadata().get("act_quant") if isinstance(w, nnx.Variable) else None
  if act is not None:
    x = fake_quantize_activations(spec, x, *act)
  return jnp.einsum(spec, x, read(w, dtype))


def fake_quantize_activations(spec: str, x, fmt, granularity: str):
  """x (float, any shape) quantized into `fmt` (a name or Format) and dequantized, in x's dtype.

  granularity "token": one dynamic scale per token, over the axes of x that `spec` ("btd,dhk->bthk") contracts;
  "tensor": one dynamic scale over all of x (the whole batch, as SmoothQuant's per-tensor dynamic mode).
  """
  if granularity not in ACT_GRANULARITIES:
    raise ValueError(f"activation granularity must be one of {ACT_GRANULARITIES}, got {granularity!r}")
  fmt = base.get_format(fmt)
  xs, ws = spec.replace(" ", "").split("->")[0].split(",")
  axes = tuple(range(x.ndim)) if granularity == "tensor" else tuple(i for i, c in enumerate(xs) if c in ws)
  enc = fmt.encode(x.astype(jnp.float32), axes)
  return fmt.decode(enc.codes, enc.scales, enc.zero_points, enc.scale2).astype(x.dtype)


def check_native(q: qarray.QArray) -> None:
  """Raises ValueError unless `native_einsum` takes q (an int8 / fp8_e4m3 QArray with per-channel scales)."""
  if q.fmt.name not in NATIVE_FORMATS or q.group_size != "channel":
    raise ValueError(f"native dots take {' or '.join(NATIVE_FORMATS)} weights with one scale per output channel "
                     f"(group_size='channel'), got {q.fmt.name} with group_size={q.group_size!r}")


def _parse(spec: str, ndim_x: int, ndim_w: int):
  if spec.count(",") != 1 or spec.count("->") != 1 or "." in spec:
    raise ValueError(f"native einsum needs an explicit two-operand spec like 'btd,dhk->bthk', got {spec!r}")
  ins, out = spec.replace(" ", "").split("->")
  xs, ws = ins.split(",")
  if (len(xs), len(ws)) != (ndim_x, ndim_w) or any(len(set(s)) != len(s) for s in (xs, ws, out)):
    raise ValueError(f"spec {spec!r} does not fit x with {ndim_x} axes and w with {ndim_w} (or repeats a letter)")
  if set(out) != set(xs) ^ set(ws):
    raise ValueError(f"spec {spec!r}: every weight letter must be contracted with x or appear only in the output")
  return xs, ws, out


def _align(a, src: str, dst: str):
  """`a` with axes labelled `src` (letters of `dst`) transposed to `dst`'s order, size-1 axes for the others."""
  sizes = dict(zip(src, a.shape))
  a = jnp.transpose(a, [src.index(c) for c in dst if c in src])
  return a.reshape([sizes.get(c, 1) for c in dst])


def _signed(codes, fmt):
  """A format's stored codes as the dot's operand dtype: int8 for integers (codes are offset by -qmin)."""
  if isinstance(fmt, int_format.IntFormat):
    return (codes.astype(jnp.int32) + fmt.qmin).astype(jnp.int8)
  return codes


def native_einsum(spec: str, x, q: qarray.QArray):
  """x (float, any dtype) times the QArray q as W8A8 per the module docstring; float32 of the output's shape."""
  check_native(q)
  xs, ws, out = _parse(spec, x.ndim, q.ndim)
  axis_letter = ws[q.axis]
  contracted = [c for c in ws if c in xs]
  if axis_letter not in contracted:
    raise ValueError(f"spec {spec!r}: the weight's quantization axis {q.axis} ({axis_letter!r}) is not contracted")
  fmt = q.fmt
  # The codes keep the QArray's blocked layout: the weight's letters with the contraction axis moved last.
  wb = ws.replace(axis_letter, "") + axis_letter
  batch = [c for c in contracted if c != axis_letter]  # scales vary along these: rescale, then sum
  enc = fmt.encode(x.astype(jnp.float32), tuple(i for i, c in enumerate(xs) if c in contracted))
  x_codes, w_codes = _signed(enc.codes, fmt), _signed(q.values, fmt)
  acc_dtype = jnp.int32 if x_codes.dtype == jnp.int8 else jnp.float32
  dims = (([xs.index(axis_letter)], [wb.index(axis_letter)]),
          ([xs.index(c) for c in batch], [wb.index(c) for c in batch]))
  acc = jax.lax.dot_general(x_codes, w_codes, dims, preferred_element_type=acc_dtype)
  free_x = "".join(c for c in xs if c not in contracted)
  free_w = "".join(c for c in wb if c not in contracted)
  acc_letters = "".join(batch) + free_x + free_w  # dot_general's output order
  sx = _align(jnp.squeeze(enc.scales, tuple(i for i, c in enumerate(xs) if c in contracted)), free_x, acc_letters)
  sw = _align(q.scales[..., 0], wb[:-1], acc_letters)
  y = acc.astype(jnp.float32) * sx * sw
  if batch:
    y = jnp.sum(y, axis=tuple(range(len(batch))))
  return jnp.transpose(y, [(free_x + free_w).index(c) for c in out])
