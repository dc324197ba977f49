"""Quantized NNX models: `quantize_model(model, recipe)` and `model_size_report(model, qmodel)`.

`quantize_model` runs `quantize_params` over the model's `nnx.Param` state (paths like "blocks/0/attn/wq") and
returns a new model of the same class whose selected Params hold `QArray`s; `model` itself is left unchanged. The
decoder reads every parameter through `cce_jax.quant.dot`, so `qmodel(tokens)` and `qmodel.classifier()` work as
for the original, eagerly and under `nnx.jit` / `jax.jit` (of `nnx.split` state): each QArray is dequantized inside
the forward into the compute dtype, and only the packed codes and scales stay in memory between calls.

With `native_dots=True` every quantized Param is marked (Variable metadata `native_dot=True`) so that the
decoder's dots quantize their activations per token into the weight's format and multiply fp8_e4m3 × fp8_e4m3 or
int8 × int8 (`dot.native_einsum`); this needs int8 or fp8_e4m3 weights with per-channel scales (recipes `int8`,
`fp8_e4m3`), and any other quantized Param is an error naming it. Embeddings and the classifier, if a custom
recipe quantizes them, are always dequantized.
"""

from __future__ import annotations

import jax
from flax import nnx

from cce_jax.quant import dot
from cce_jax.quant import params as qparams_lib
from cce_jax.quant import qarray


def _is_q(x) -> bool:
  return isinstance(x, qarray.QArray)


def _param_dict(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def quantize_model(model: nnx.Module, recipe, *, native_dots: bool = False) -> nnx.Module:
  """A copy of `model` whose Params selected by `recipe` (a name or rules, `quant.recipes`) hold QArrays.

  Errors (one-line ValueError / TypeError naming the parameter path or the rule, before anything is built): those
  of `quantize_params` (a rule that matches no path, a bad group size, a non-float or non-finite parameter, an
  unknown format), and with `native_dots` a quantized Param whose format or blocks the native dots do not take.
  """
  qparams = qparams_lib.quantize_params(_param_dict(model), recipe)
  quantized = {qparams_lib.path_str(p): q
               for p, q in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_q)[0] if _is_q(q)}
  if native_dots:
    for path, q in quantized.items():
      try:
        dot.check_native(q)
      except ValueError as e:
        raise ValueError(f"parameter {path!r}: {e}") from None
  graphdef, state = nnx.split(nnx.clone(model))
  flat = []
  for path, var in nnx.to_flat_state(state):
    key = "/".join(str(k) for k in path)
    if key in quantized and isinstance(var, nnx.Param):
      var = var.replace(quantized[key], **({"native_dot": True} if native_dots else {}))
    flat.append((path, var))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_size_report(model: nnx.Module, qmodel: nnx.Module) -> dict:
  """`size_report` of the two models' Param states: bytes per parameter and in total, before and after."""
  return qparams_lib.size_report(_param_dict(model), _param_dict(qmodel))
