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

With `act_quant=(format, "token" | "tensor")` every quantized Param is marked (metadata `act_quant`: the Format
and the granularity) so that the dots fake-quantize their activations into that format first, with dynamic
scales per token or per tensor (`dot.fake_quantize_activations`): W8A8 evaluated on any device
(`quant.w8a8_recipes`). It excludes `native_dots`.
"""

from __future__ import annotations

import jax
from flax import nnx

from cce_jax.quant import dot
from cce_jax.quant import params as qparams_lib
from cce_jax.quant import qarray
from cce_jax.quant.formats import base as formats_base


def _is_q(x) -> bool:
  return isinstance(x, qarray.QArray)


def _param_dict(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def quantize_model(model: nnx.Module, recipe, *, native_dots: bool = False, act_quant=None) -> nnx.Module:
  """A copy of `model` whose Params selected by `recipe` (a name or rules, `quant.recipes`) hold QArrays.

  Errors (one-line ValueError / TypeError naming the parameter path or the rule, before anything is built): those
  of `quantize_params` (a rule that matches no path, a bad group size, a non-float or non-finite parameter, an
  unknown format), and with `native_dots` a quantized Param whose format or blocks the native dots do not take;
  an `act_quant` that is not (a format name, "token" or "tensor"), or given with `native_dots`.
  """
  meta = {"native_dot": True} if native_dots else {}
  if act_quant is not None:
    if native_dots:
      raise ValueError("quantize_model: give native_dots or act_quant, not both (native dots quantize the "
                       "activations per token themselves)")
    if (not isinstance(act_quant, (tuple, list)) or len(act_quant) != 2
        or act_quant[1] not in dot.ACT_GRANULARITIES):
      raise ValueError(f"quantize_model: act_quant must be (format name, 'token' or 'tensor'), got {act_quant!r}")
    meta = {"act_quant": (formats_base.get_format(act_quant[0]), act_quant[1])}
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
      var = var.replace(quantized[key], **meta)
    flat.append((path, var))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_size_report(model: nnx.Module, qmodel: nnx.Module) -> dict:
  """`size_report` of the two models' Param states: bytes per parameter and in total, before and after."""
  return qparams_lib.size_report(_param_dict(model), _param_dict(qmodel))
