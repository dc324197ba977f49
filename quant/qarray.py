"""`QArray`: a quantized array as a registered pytree (codes, scales, zero points; static format metadata).

Layout. `quantize` moves the contraction `axis` of x (shape S, dtype T) last and splits it into blocks: the
"blocked shape" is S with `axis` moved last, then (per group of g) that last axis split into (K/g, g), or (2-D
blocks b0×b1, 2-D x only) (N/b1, b1, K/b0, b0). The children are

- `values`: the format's codes in the blocked shape; codes of 4 (or 3) bits are packed two per uint8 along the last
  axis, 2-bit codes four per uint8 (the last axis padded to a whole byte), so `values` has a shorter last axis;
- `scales`: one per block, the blocked shape with the within-block axes of size 1 (format-specific dtype);
- `zero_points`: asymmetric integer formats only (uint8, the shape of `scales`), else None;
- `scale2`: a second-level scale (NVFP4's per-tensor fp32 scale, NF4's double-quantization scales), else None.

The aux data (static under jit) are the `Format` (hashable, with its options), `axis`, `group_size` ("tensor",
"channel", an int or a pair), the original `shape` and `dtype` and the `blocked_shape`. Under `jax.vmap` the
children carry the mapped axis in front and `dequantize` sees them per example. Orbax's `StandardCheckpointer`
saves a QArray and restores it given the abstract QArray (`tree_map(ocp.utils.to_shape_dtype_struct, q)`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.quant.formats import base


def pack(codes, container_bits: int):
  """uint8 `codes` (< 2^container_bits) packed 8/container_bits per byte along the last axis (zero-padded)."""
  if container_bits == 8:
    return codes
  per = 8 // container_bits
  pad = -codes.shape[-1] % per
  codes = jnp.pad(codes.astype(jnp.uint8), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
  codes = codes.reshape(*codes.shape[:-1], -1, per)
  shifts = jnp.arange(per, dtype=jnp.uint8) * container_bits
  return jnp.sum(codes << shifts, axis=-1, dtype=jnp.uint8)


def unpack(packed, container_bits: int, length: int):
  """The inverse of `pack`: uint8 codes with a last axis of `length`."""
  if container_bits == 8:
    return packed
  per = 8 // container_bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * container_bits
  codes = (packed[..., None] >> shifts) & jnp.uint8((1 << container_bits) - 1)
  return codes.reshape(*packed.shape[:-1], -1)[..., :length]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array; see the module docstring. `dequantize()` returns the original shape and dtype."""
  values: Any
  scales: Any
  zero_points: Any
  scale2: Any
  fmt: base.Format
  axis: int
  group_size: Any
  shape: tuple[int, ...]
  dtype: str
  blocked_shape: tuple[int, ...]

  def tree_flatten(self):
    children = (self.values, self.scales, self.zero_points, self.scale2)
    aux = (self.fmt, self.axis, self.group_size, self.shape, self.dtype, self.blocked_shape)
    return children, aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def bits_per_weight(self) -> float:
    """Storage bits (values, scales, zero points, second-level scales) per element of the original array."""
    leaves = jax.tree_util.tree_leaves((self.values, self.scales, self.zero_points, self.scale2))
    bits = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize * 8 for leaf in leaves)
    # Under vmap the leaves are per example; outside it they may carry a leading batch of QArrays.
    batch = math.prod(self.values.shape) // max(1, math.prod(self._per_example_values_shape()))
    return bits / (batch * math.prod(self.shape))

  def _per_example_values_shape(self) -> tuple[int, ...]:
    per = 8 // self.fmt.container_bits
    return (*self.blocked_shape[:-1], -(-self.blocked_shape[-1] // per))

  def dequantize(self):
    """The dequantized array, shape `shape`, dtype `dtype` (computed in float32, then cast)."""
    return _dequantize(self)

  def _dequantize(self):
    codes = unpack(self.values, self.fmt.container_bits, self.blocked_shape[-1])
    x = self.fmt.decode(codes, self.scales, self.zero_points, self.scale2)
    moved = list(self.shape)
    moved.append(moved.pop(self.axis))
    x = x.reshape(*x.shape[:x.ndim - len(self.blocked_shape)], *moved)
    return jnp.moveaxis(x, -1, self.axis - len(self.shape)).astype(self.dtype)


_dequantize = jax.jit(QArray._dequantize)  # one compilation per layout instead of one per primitive
