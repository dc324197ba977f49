"""SmoothQuant (Xiao et al. 2023) for one linear layer: migration scales, and W8A8 fake-quantized matmuls.

The math follows mit-han-lab/smoothquant (`smooth.py`). Per input channel j of a kernel W [in, out] (contraction
axis 0) fed by x [N, in]:

  s_j = max(max_n |x_nj|, 1e-5)^α / max(max_o |W_jo|, 1e-5)^(1−α), then s_j ≥ 1e-5,

where the weight maximum runs over all output channels (of every kernel in the list, for q/k/v or gate/up). The
smoothed layer is (x / s) @ (s · W): exact in full precision; the activation outliers shrink by s and the weights
grow by s, which moves quantization difficulty from activations to weights (α = 0.5 balances them). Fold s into
the producer of x with `cce_jax.quant.awq.fold_scale` and into W with `cce_jax.quant.awq.scale_input`.

`w8a8_matmul(x, w, *, act=..., weight=...)`: x @ w with both operands in int8. Weights per output channel
("channel") or per tensor ("tensor"); activations per token, dynamic ("token"), or per tensor ("tensor", the
scale taken from x itself). "token" × "channel" runs through `cce_jax.quant.dot.native_einsum` (an int8 × int8
dot with int32 accumulation); the other combinations are fake-quantized (dequantized operands, fp32 matmul).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cce_jax.quant import dot
from cce_jax.quant.quantize import fake_quantize, quantize

_HI = jax.lax.Precision.HIGHEST


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
