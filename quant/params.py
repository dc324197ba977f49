"""`quantize_params(params, recipe)`: round-to-nearest over a parameter pytree by a recipe (`quant.recipes`).

`params` is a pytree of arrays: a nested dict / list (e.g. `nnx.to_pure_dict(nnx.state(model, nnx.Param))`).
Each leaf's path is its keys joined with "/" ("blocks/0/mlp/w1"); the first rule whose pattern matches it decides
(format and options, or full precision), and unmatched leaves are returned unchanged (the same array objects).

All or nothing: every error is raised before anything is returned, as a one-line ValueError / TypeError naming the
parameter path (a non-float leaf, NaN/Inf in a concrete leaf, a group size that does not divide the axis, an axis
out of range, an unknown format) or the rule (a rule that matches no path).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.quant import qarray
from cce_jax.quant.quantize import quantize as _quantize
from cce_jax.quant import recipes
from cce_jax.quant.formats import base


def _key_str(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path) -> str:
  """A JAX key path as "a/b/0/c"."""
  return "/".join(_key_str(k) for k in path)


def _is_q(x) -> bool:
  return isinstance(x, qarray.QArray)


def _group_for(rule, fmt, shape, axis):
  g = fmt.default_group if rule.group_size is None else rule.group_size
  if rule.clip_group and isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g > shape[axis]:
    return int(shape[axis])
  return g


def quantize_params(params, recipe):
  """`params` with every leaf selected by `recipe` (a name or rules, `quant.recipes`) replaced by a `QArray`.

  Same tree structure; unselected leaves are returned as they are. Works under `jax.jit` (NaN/Inf are then not
  checked). Raises (nothing half-quantized) as the module docstring says.
  """
  rules = recipes.as_rules(recipe)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in leaves]
  for rule in rules:
    if not any(rule.matches(p) for p in paths):
      raise ValueError(f"recipe rule {rule.pattern!r} -> {rule.format} matches no parameter path "
                       f"(paths look like {paths[0] if paths else '<none>'!r})")
  out = []
  for path, (_, x) in zip(paths, leaves):
    rule = next((r for r in rules if r.matches(path)), None)
    if rule is None or rule.format is None:
      out.append(x)
      continue
    try:
      fmt = base.get_format(rule.format)
      x = jnp.asarray(x) if not isinstance(x, jax.core.Tracer) else x
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"dtype {x.dtype} is not a float dtype")
      in_range = -x.ndim <= rule.axis < x.ndim
      group = _group_for(rule, fmt, x.shape, rule.axis % x.ndim) if in_range else rule.group_size
      out.append(_quantize(x, fmt, axis=rule.axis, group_size=group))
    except (ValueError, TypeError) as e:
      raise type(e)(f"parameter {path!r} (shape {tuple(np.shape(x))}, rule {rule.pattern!r} -> "
                    f"{rule.format}): {e}") from None
  return jax.tree_util.tree_unflatten(treedef, out)


def dequantize_params(qparams):
  """`qparams` with every `QArray` replaced by its `dequantize()` (original shape and dtype); other leaves as is."""
  return jax.tree_util.tree_map(lambda x: x.dequantize() if _is_q(x) else x, qparams, is_leaf=_is_q)


def _bits(x) -> int:
  leaves = jax.tree_util.tree_leaves(x)
  return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize * 8 for leaf in leaves)


def size_report(params, qparams) -> dict:
  """Storage before and after, per parameter path and in total.

  Returns {"params": {path: {"shape", "before_bits", "after_bits", "before_bytes", "after_bytes",
  "bits_per_weight", "format"}}, "total": {"before_bits", "after_bits", "before_bytes", "after_bytes",
  "bits_per_weight", "quantized", "count"}}; bits_per_weight = after_bits / elements, bytes = bits / 8 (a QArray
  counts its codes, scales, zero points and second-level scales).
  """
  before = jax.tree_util.tree_flatten_with_path(params)[0]
  after = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_q)[0]
  if [path_str(p) for p, _ in before] != [path_str(p) for p, _ in after]:
    raise ValueError("size_report: params and qparams do not have the same paths")
  rows, n_el, n_q = {}, 0, 0
  for (p, x), (_, q) in zip(before, after):
    b0, b1, el = _bits(x), _bits(q), math.prod(np.shape(x))
    rows[path_str(p)] = {"shape": tuple(np.shape(x)), "before_bits": b0, "after_bits": b1, "before_bytes": b0 / 8,
                         "after_bytes": b1 / 8, "bits_per_weight": b1 / max(el, 1),
                         "format": q.fmt.name if _is_q(q) else None}
    n_el += el
    n_q += _is_q(q)
  tb0 = sum(r["before_bits"] for r in rows.values())
  tb1 = sum(r["after_bits"] for r in rows.values())
  return {"params": rows, "total": {"before_bits": tb0, "after_bits": tb1, "before_bytes": tb0 / 8,
                                    "after_bytes": tb1 / 8, "bits_per_weight": tb1 / max(n_el, 1),
                                    "quantized": n_q, "count": len(rows)}}
