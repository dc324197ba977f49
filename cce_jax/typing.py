"""Shape-annotated array types for signatures (jaxtyping when installed, plain `jax.Array` otherwise).

The annotations document shapes, e.g. `Float[Array, "*B D"]`; nothing is checked at run time.
"""

from __future__ import annotations

import jax

Array = jax.Array

try:
  from jaxtyping import Float, Int  # noqa: F401
except ImportError:  # jaxtyping is optional: keep the annotations readable without it.

  class _Annotation:
    def __class_getitem__(cls, item):
      del item
      return jax.Array

  class Float(_Annotation):
    """`Float[Array, "N D"]`: a floating-point array of that shape."""

  class Int(_Annotation):
    """`Int[Array, "N"]`: an integer array of that shape."""
