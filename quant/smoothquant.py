"""SmoothQuant (Xiao et al. 2023): migration scales per layer, their fold over a whole decoder, W8A8 matmuls.

The math follows mit-han-lab/smoothquant (`smooth.py`). Per input channel j of a kernel W [in, out] (contraction
axis 0) fed by x [N, in]:

  s_j = max(max_n |x_nj|, 1e-5)^α / max(max_o |W_jo|, 1e-5)^(1−α), then s_j ≥ 1e-5,

where the weight maximum runs over all output channels (of every kernel in the list, for q/k/v or gate/up). The
smoothed layer is (x / s) @ (s · W): exact in full precision; the activation outliers shrink by s and the weights
grow by s, which moves quantization difficulty from activations to weights (α = 0.5 balances them). Fold s into
the producer of x with `cce_jax.quant.awq.fold_scale` and into W with `cce_jax.quant.awq.scale_input`.

`smoothquant(model_or_params, act_stats, *, alpha=0.5)` smooths a whole `cce_jax.models.Decoder` (or its Param
dict). For each block k and each input it smooths (default "qkv", "up", "down"), s comes from
`act_stats["blocks/k/<input>"]` (the per-channel max |x| of `quant.calibration_stats`) and the kernels that input
feeds, and is folded by `calibrate`'s AWQ fold: attn_norm.scale / s with wq, wk, wv · s; mlp_norm.scale / s with
w1, w3 · s; w3's columns / s with w2 · s; for "o" (only when asked, and only without grouped-query attention)
wv / s with wo · s. Smoothing the inputs in this order with statistics of the unsmoothed model is exact: each
fold leaves every block input but its own unchanged, and that one becomes x / s.

`w8a8_matmul(x, w, *, act=..., weight=...)`: x @ w with both operands in int8. Weights per output channel
("channel") or per tensor ("tensor"); activations per token, dynamic ("token"), or per tensor ("tensor", the
scale taken from x itself). "token" × "channel" runs through `cce_jax.quant.dot.native_einsum` (an int8 × int8
dot with int32 accumulation); the other combinations are fake-quantized (dequantized operands, fp32 matmul).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cce_jax.quant import calib_block
from cce_jax.quant import calibrate
from cce_jax.quant import dot
from cce_jax.quant.quantize import fake_quantize, quantize

_HI = jax.lax.Precision.HIGHEST

SMOOTHED = ("qkv", "up", "down")
"""The block inputs `smoothquant` smooths by default (names of `calib_block.INPUTS`)."""


def smoothquant_scales(act_absmax, w, *, alpha: float = 0.5):
  """Migration scales s [in] (float32) from the per-channel max |x| [in] and a kernel [in, ...] (or a list).

  See the module docstring for the formula; α in [0, 1].
  """
  ws = [jnp.asarray(v) for v in (w if isinstance(w, (list, tuple)) else [w])]
  act_absmax = jnp.asarray(act_absmax, jnp.float32)
  if act_absmax.ndim != 1:
    raise ValueError(f"smoothquant_scales: act_absmax must be 1-D [in], got shape {tuple(act_absmax.shape)}")
  n_in = act_absmax.shape[0]
  for v in ws:
    if v.ndim < 2 or v.shape[0] != n_in:
      raise ValueError(f"smoothquant_scales: kernels must be [in={n_in}, ...] to match act_absmax, got shapes "
                       f"{[tuple(u.shape) for u in ws]}")
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"smoothquant_scales: alpha must be in [0, 1], got {alpha}")
  w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(v.reshape(n_in, -1).astype(jnp.float32)), axis=1) for v in ws]),
                  axis=0)
  s = jnp.maximum(act_absmax, 1e-5) ** alpha / jnp.maximum(w_max, 1e-5) ** (1.0 - alpha)
  return jnp.maximum(s, 1e-5)


def w8a8_matmul(x, w, *, act: str = "token", weight: str = "channel"):
  """x [..., in] @ w [in, out] with int8 activations (`act`: "token" / "tensor") and int8 weights (`weight`:
  "channel" / "tensor"); float inputs, float32 output [..., out]."""
  if act not in ("token", "tensor") or weight not in ("channel", "tensor"):
    raise ValueError(f"w8a8_matmul: act must be 'token' or 'tensor' and weight 'channel' or 'tensor', got "
                     f"act={act!r}, weight={weight!r}")
  x, w = jnp.asarray(x), jnp.asarray(w)
  if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"w8a8_matmul: x [..., in] and w [in, out] do not fit: shapes {tuple(x.shape)}, "
                     f"{tuple(w.shape)}")
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  qw = quantize(w32, "int8", axis=0, group_size=weight)
  if act == "token" and weight == "channel":
    x2 = x32.reshape(-1, x.shape[-1])
    return dot.native_einsum("ni,io->no", x2, qw).reshape(*x.shape[:-1], w.shape[1])
  group = "channel" if act == "token" else "tensor"
  xq = fake_quantize(x32, "int8", axis=-1, group_size=group)
  return jnp.matmul(xq, qw.dequantize(), precision=_HI)


class _Leaf:
  """One entry of a Param dict, read and written as `calibrate._fold` reads and writes a Variable."""

  def __init__(self, parent: dict, key):
    self._parent, self._key = parent, key

  def get_value(self):
    return self._parent[self._key]

  def set_value(self, value):
    self._parent[self._key] = value


class _Node:
  """A (nested) Param dict seen as a module: `node.attn.wq` is a `_Leaf`."""

  def __init__(self, tree: dict):
    self._tree = tree

  def __getattr__(self, name):
    if name.startswith("_") or name not in self._tree:
      raise AttributeError(name)
    value = self._tree[name]
    return _Node(value) if isinstance(value, dict) else _Leaf(self._tree, name)


def _leading(w, n: int):
  """w as [n, -1] when its leading axes hold n elements (w itself otherwise: `smoothquant_scales` names it)."""
  for k in range(1, w.ndim):
    if math.prod(w.shape[:k]) == n:
      return w.reshape(n, -1)
  return w


def _act_max(act_stats, key):
  if key not in act_stats:
    raise ValueError(f"smoothquant: act_stats has no entry {key!r} (give quant.calibration_stats(model, tokens))")
  v = act_stats[key]
  return v["act_max"] if isinstance(v, dict) else v


def smoothquant(model_or_params, act_stats, *, alpha: float = 0.5, inputs=SMOOTHED):
  """A smoothed copy of a Decoder or of its Param dict (module docstring); the argument is left unchanged.

  Args:
    model_or_params: a `cce_jax.models.Decoder`, or `nnx.to_pure_dict(nnx.state(model, nnx.Param))` of one
      (full-precision arrays).
    act_stats: {"blocks/k/<input>": {"act_max": float [in], ...} or float [in]}: `quant.calibration_stats`.
    alpha: the migration strength α in [0, 1].
    inputs: which block inputs to smooth, among "qkv", "o", "up", "down"; "o" needs KV == H.

  Returns the same kind of object with the RMSNorm scales and kernels folded: in full precision it computes the
  same function (up to float rounding). A missing statistic, an unknown input or "o" under grouped-query
  attention raise a one-line ValueError.
  """
  unknown = [n for n in inputs if n not in calib_block.INPUTS]
  if unknown:
    raise ValueError(f"smoothquant: unknown input {unknown[0]!r}; known: {', '.join(calib_block.INPUTS)}")
  if isinstance(model_or_params, nnx.Module):
    result = nnx.clone(model_or_params)
    blocks, cfg = list(result.blocks), result.cfg
    kv_eq_h = cfg.KV == cfg.H
  else:
    result = jax.tree.map(lambda x: x, model_or_params)  # new containers, same leaves
    if "blocks" not in result:
      raise ValueError("smoothquant: a Param dict needs a 'blocks' entry (a Decoder's nnx.to_pure_dict)")
    blocks = [_Node(result["blocks"][k]) for k in sorted(result["blocks"], key=int)]
    kv_eq_h = bool(blocks) and (jnp.shape(blocks[0].attn.wq.get_value())[1]
                                == jnp.shape(blocks[0].attn.wk.get_value())[1])
  if "o" in inputs and not kv_eq_h:
    raise ValueError("smoothquant: input 'o' folds into wv only without grouped-query attention (KV == H)")
  # pylint: disable=protected-access
  for k, block in enumerate(blocks):
    for name in inputs:
      act_max = jnp.asarray(_act_max(act_stats, f"blocks/{k}/{name}"))
      ws = [calibrate._read(calibrate._get(block, p)) for p in calib_block.KERNELS[name]]
      ws = [_leading(w, act_max.size) for w in ws]  # wo [H, K, D] is fed [H·K]
      s = smoothquant_scales(act_max, ws, alpha=alpha)
      calibrate._fold(block, name, s, kv_eq_h)
  return result
