"""The format interface and the registry of formats by name.

A format turns a float32 array that `quantize` has already split into blocks into codes and scales, and back:

- `encode(x, reduce_axes)`: `x` float32 of any shape; `reduce_axes` are the axes that one scale covers (the
  elements of a block). Returns an `Encoded`: `codes` of `x`'s shape (the format's `code_dtype`: unsigned codes for
  packed and integer formats, a jnp float8 dtype for fp8 elements), and `scales` (and for some formats
  `zero_points` / `scale2`) with `reduce_axes` kept as size-1 axes.
- `decode(codes, scales, zero_points, scale2)`: float32 of `codes`' shape.

`container_bits` is the storage of one code: 8 (one per byte), 4 (two per byte) or 2 (four per byte). A format is
a frozen, hashable dataclass: a `QArray` keeps it as static metadata, so options (the int4 divisor, the MX exponent
rule, NF4 double quantization) travel with the array.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp


class Encoded(NamedTuple):
  """What a format's `encode` returns (see the module docstring); unused fields are None."""
  codes: Any
  scales: Any
  zero_points: Any = None
  scale2: Any = None


@dataclasses.dataclass(frozen=True)
class Format:
  """Base of every format; subclasses set the fields and implement `encode` / `decode`."""
  name: str

  container_bits = 8
  code_dtype = jnp.uint8
  default_group = "channel"
  """`group_size=None` means this: "channel" (one scale per slice along the axis) or a block length."""
  allows_2d_blocks = False

  def encode(self, x, reduce_axes) -> Encoded:
    raise NotImplementedError

  def decode(self, codes, scales, zero_points=None, scale2=None):
    raise NotImplementedError


def amax(x, reduce_axes):
  """max |x| over `reduce_axes`, kept as size-1 axes (float32)."""
  return jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)


_REGISTRY: dict[str, Callable[..., Format]] = {}


def register(name: str, factory: Callable[..., Format]) -> None:
  """Makes `get_format(name, **options)` return `factory(**options)`."""
  _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
  """The registered format names, sorted."""
  return tuple(sorted(_REGISTRY))


def get_format(fmt: str | Format, **options) -> Format:
  """A `Format` from its name (with options, e.g. `get_format("int4", divisor=7.5)`), or `fmt` itself."""
  if isinstance(fmt, Format):
    if options:
      raise ValueError(f"options {sorted(options)} given with a Format instance; build the instance with them")
    return fmt
  if not isinstance(fmt, str) or fmt not in _REGISTRY:
    raise ValueError(f"unknown quantization format {fmt!r}; known formats: {', '.join(names())}")
  return _REGISTRY[fmt](**options)
