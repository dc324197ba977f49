"""The op inside `jax.shard_map`: every value there has a type naming the mesh axes it varies over (with
check_vma=True, the default), and loop carries and Pallas kernel outputs must state theirs.

The public functions make e, c, bias and the targets the backends see vary over the union of the inputs' axes
(`axes`, `vary`): a type change, free at run time, whose transpose sums the gradient of an input that did not vary
(a replicated classifier under data-parallel tokens) over those axes, as JAX does for any such input. The token
mask and weights keep their own axes, so that per-token results merged over a vocabulary split stay invariant
over its axes. Internally, constant loop carries and kernel outputs take the axes of the hidden states (`vary`,
`kernel_out`). Outside shard_map every input's set is empty and all of this is a no-op.
"""

from __future__ import annotations

import jax
from jax import lax


def axes(*arrays) -> tuple:
  """The manual mesh axes that any of `arrays` (None skipped) varies over; () outside shard_map."""
  found = set()
  for a in arrays:
    if a is not None:
      found |= jax.typeof(a).mat.varying
  return tuple(sorted(found, key=str))


def vary(tree, names):
  """Every array of `tree` made to vary over the mesh axes `names` as well."""
  if not names:
    return tree

  def one(x):
    missing = tuple(a for a in names if a not in jax.typeof(x).mat.varying)
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(one, tree)


def kernel_out(shapes, like):
  """Kernel output ShapeDtypeStructs (a list, or one) that vary over the axes of the array `like`."""
  names = axes(like)
  if not names:
    return shapes
  mat = jax.sharding.ManualAxisType(varying=frozenset(names))
  one = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat)
  return [one(s) for s in shapes] if isinstance(shapes, (list, tuple)) else one(shapes)
