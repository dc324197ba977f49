"""An NNX model <-> a flat {"path/to/param": array} dict (what the optimizer and the checkpoints see)."""

from __future__ import annotations

import jax
from flax import nnx


def _name(path) -> str:
  parts = []
  for k in path:
    key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    parts.append(str(key))
  if parts and parts[-1] == "value":
    parts = parts[:-1]
  return "/".join(parts)


class ParamCodec:
  """Splits a model once; `to_dict(model)` and `to_model(params)` convert with the same names and structure."""

  def __init__(self, model: nnx.Module):
    self.graphdef, state = nnx.split(model)
    leaves_with_path, self.treedef = jax.tree_util.tree_flatten_with_path(state)
    self.names = [_name(p) for p, _ in leaves_with_path]
    if len(set(self.names)) != len(self.names):
      raise ValueError("parameter paths are not unique after flattening")

  def to_dict(self, model: nnx.Module) -> dict:
    _, state = nnx.split(model)
    return dict(zip(self.names, jax.tree.leaves(state)))

  def to_model(self, params: dict) -> nnx.Module:
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, [params[n] for n in self.names]))
