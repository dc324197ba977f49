"""`quantize(x, fmt) -> QArray` and `fake_quantize(x, fmt)`: round-to-nearest into a named format.

`axis` is the contraction axis (0 for Flax `Dense` kernels `[in, out]`); blocks run along it. `group_size`:

- None: the format's default: "channel" for the int and fp8 formats, 32 for MX, 16 for NVFP4, 64 for NF4;
- "channel" (or the axis length): one scale per slice along `axis` (per output channel of a kernel);
- "tensor": one scale for the whole array (int and fp8 formats);
- an int g dividing the axis length: one scale per g consecutive elements along `axis`;
- a pair (b0, b1) (int and fp8 formats, 2-D x only): b0×b1 blocks, b0 along `axis`, b1 along the other axis.

Errors (ValueError / TypeError, one line): a non-float x, a 0-d x, `axis` out of range, a group size that does not
divide the axis, an unknown format (the known ones are listed), NaN or Inf in x (checked on concrete arrays only;
under `jit` the values are not visible and NaN propagates into the scales).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.quant import qarray
from cce_jax.quant.formats import base


def _blocking(shape, axis, group_size, fmt):
  """(normalized group_size, blocked shape, reduce axes) for x moved to `axis`-last of `shape` (module docstring)."""
  moved = list(shape)
  k = moved.pop(axis)
  moved.append(k)
  g = fmt.default_group if group_size is None else group_size
  if isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g == k and fmt.default_group == "channel":
    g = "channel"
  n = len(moved)
  if g == "tensor":
    if not fmt.allows_2d_blocks:
      raise ValueError(f"group_size='tensor' is not available for {fmt.name}; it takes an int group size")
    return g, tuple(moved), tuple(range(n))
  if g == "channel":
    return g, tuple(moved), (n - 1,)
  if isinstance(g, tuple):
    if not fmt.allows_2d_blocks:
      raise ValueError(f"2-D blocks group_size={g} are not available for {fmt.name}; it takes an int group size")
    if len(g) != 2 or len(shape) != 2:
      raise ValueError(f"2-D blocks group_size={g} need a pair and a 2-D array, got x of shape {tuple(shape)}")
    b0, b1 = (int(b) for b in g)
    if b0 <= 0 or b1 <= 0 or k % b0 or moved[0] % b1:
      raise ValueError(f"2-D blocks group_size={g} must divide the axes ({k}, {moved[0]}) of x with shape "
                       f"{tuple(shape)} (axis={axis} first)")
    return (b0, b1), (moved[0] // b1, b1, k // b0, b0), (1, 3)
  if isinstance(g, (int, np.integer)) and not isinstance(g, bool):
    if g <= 0 or k % g:
      raise ValueError(f"group_size={g} must divide the size {k} of axis {axis} of x with shape {tuple(shape)}")
    return int(g), (*moved[:-1], k // g, int(g)), (n,)
  raise ValueError(f"group_size must be None, 'channel', 'tensor', an int or a pair, got {g!r}")


def _check_input(x, axis):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize expects a floating-point array, got dtype {x.dtype}")
  if x.ndim == 0:
    raise ValueError("quantize expects an array with at least one axis, got a scalar")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis={axis} is out of range for x with shape {tuple(x.shape)}")
  if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError(f"x (shape {tuple(x.shape)}) contains NaN or Inf; it cannot be quantized")


def quantize(x, fmt, *, axis: int = 0, group_size=None) -> qarray.QArray:
  """Quantizes `x` (any float dtype, ≥ 1 axis) into `fmt` (a name or a `Format`) with blocks along `axis`.

  Round-to-nearest by the format's rule (see `cce_jax.quant.formats`); computed in float32. Returns a `QArray`
  whose `dequantize()` has x's shape and dtype.
  """
  x = jnp.asarray(x)
  fmt = base.get_format(fmt)
  _check_input(x, axis)
  axis = axis % x.ndim
  group, blocked, reduce_axes = _blocking(x.shape, axis, group_size, fmt)
  return _quantize_blocked(x, fmt, axis, group, blocked, reduce_axes)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize_blocked(x, fmt, axis, group, blocked, reduce_axes):
  # Jitted as a whole: one compilation per shape and format instead of one per primitive in eager mode.
  xb = jnp.moveaxis(x.astype(jnp.float32), axis, -1).reshape(blocked)
  enc = fmt.encode(xb, reduce_axes)
  return qarray.QArray(
      values=qarray.pack(enc.codes, fmt.container_bits), scales=enc.scales, zero_points=enc.zero_points,
      scale2=enc.scale2, fmt=fmt, axis=axis, group_size=group, shape=tuple(x.shape),
      dtype=jnp.dtype(x.dtype).name, blocked_shape=tuple(blocked))


def fake_quantize(x, fmt, *, axis: int = 0, group_size=None):
  """`quantize(x, fmt, axis=axis, group_size=group_size).dequantize()`: x's shape and dtype, values on the grid."""
  return quantize(x, fmt, axis=axis, group_size=group_size).dequantize()
