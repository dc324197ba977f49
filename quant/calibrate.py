"""Block-by-block calibrated quantization of a `cce_jax.models.Decoder`: GPTQ, AWQ, and AWQ scales then GPTQ.

    qmodel = quant.calibrated_quantize(model, calib_tokens, "gptq", "int4", group_size=128, act_order=True)

Calibration. The token windows are embedded once; then for block k = 0, 1, …: every calibration batch runs through
block k (`calib_block.block_pieces`) and what the method needs is accumulated on the device per kernel input
(attn_norm output for wq/wk/wv, attention output for wo, mlp_norm output for w1/w3, SwiGLU hidden for w2):

- GPTQ: the Hessian 2 XᵀX / n (`hessian_update`, a running mean: one [in, in] fp32 matrix per input);
- AWQ: the per-channel mean |x| over all tokens, and a strided subsample of at most 512 tokens (every
  ⌈n / 512⌉-th token of the stream) on which the scale and clip searches run;
- per-channel max |x| (for SmoothQuant-style statistics; `calibration_stats`).

The linear inputs are never all kept; what is kept across blocks is the residual stream of the calibration batches
([n tokens, D] in the compute dtype, the same as IST-DASLab GPTQ's `inps`). All four inputs of a block are captured
in one pass over the block as it was before its own quantization (IST GPTQ without `--true-sequential`; llm-awq
likewise captures a block's inputs once). Then the block is quantized and its outputs go to block k + 1:
`propagate="quantized"` (default, as GPTQ does: later blocks are calibrated on the inputs they will see at
inference, so they can absorb earlier errors) or `propagate="full"` (the full-precision outputs).

Methods (`method`):
- "gptq": `quant.gptq` of every kernel with its input's Hessian (act_order: descending diag H; with an int group
  size act_order uses static groups, so the QArray layout and inference cost are those of RTN);
- "awq": the AWQ scale search on the subsample (q/k/v scored jointly, w1/w3 jointly), the scales folded into the
  previous op (attn_norm.scale / s and wq, wk, wv · s; mlp_norm.scale / s and w1, w3 · s; w3 columns / s and w2 · s;
  wv / s and wo · s only when KV == H — with grouped-query attention wo gets no scale), then the clip search and
  round-to-nearest (`quant.awq` with grid=1 on the folded kernels);
- "fp_search": `quant.fp_search` of every kernel (fmt `fp{b}_search`: the b-bit float split and clip ratio with the
  least output error, scored with the input's Hessian; a format's fixed fields are not searched: `search_space`);
- "awq+gptq": the AWQ scales folded as above, then GPTQ on the folded kernels with the Hessian of x / s
  (H / (s sᵀ): no second capture); AWQ's clip search is not applied (GPTQ's error feedback takes its place).

The fold is exact in full precision (test: the folded model's logits equal the original's). Layouts: each QArray
is laid out as `quantize_params` with `recipes.decoder_rules` would lay it out (wq/wk/wv/w1/w3/w2 along axis 0; wo
along axis 1 with groups clipped to head_dim), so size reports, dot and checkpoints take it unchanged. An int group
size that does not divide a kernel's input size uses the largest divisor below it (SmolLM2's 576: 96).
Formats: the integer formats (GPTQ's); AWQ takes any format `quantize` takes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cce_jax.quant import calib_block
from cce_jax.quant import hessian as hessian_lib
from cce_jax.quant import qarray
from cce_jax.quant.awq import CLIP_TOKENS, awq, awq_scales, fold_scale, scale_input, scale_search_losses
from cce_jax.quant.formats import base
from cce_jax.quant.fp_search import fp_search, search_space
from cce_jax.quant.gptq import gptq
from cce_jax.quant.quantize import quantize

METHODS = ("gptq", "awq", "awq+gptq", "fp_search")
PROPAGATE = ("quantized", "full")


def calibration_windows(tokens, seq_len: int) -> np.ndarray:
  """int32 [N, seq_len] windows: a 1-D stream cut into non-overlapping windows, or [N, T] windows as they are."""
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise TypeError(f"calibration tokens must be integer ids, got dtype {tokens.dtype}")
  if tokens.ndim == 2:
    return tokens.astype(np.int32)
  if tokens.ndim != 1:
    raise ValueError(f"calibration tokens must be a 1-D stream or [N, T] windows, got shape {tokens.shape}")
  n = len(tokens) // seq_len
  if n < 1:
    raise ValueError(f"{len(tokens)} calibration tokens make no window of {seq_len}")
  return tokens[:n * seq_len].reshape(n, seq_len).astype(np.int32)


def _fit_group(n: int, group_size):
  """The group size used on an input axis of n: "channel" for None, else the largest divisor of n ≤ group_size."""
  if group_size is None or group_size == "channel" or group_size >= n:
    return "channel"
  return max(d for d in range(1, group_size + 1) if n % d == 0)


class _Stats:
  """Per-input accumulators on the device (module docstring): Hessian, Σ|x|, max|x|, token subsample."""

  def __init__(self, k: int, stride: int, need_hessian: bool):
    self.h = hessian_lib.hessian_init(k) if need_hessian else None
    self.abs_sum = jnp.zeros((k,), jnp.float32)
    self.abs_max = jnp.zeros((k,), jnp.float32)
    self.count = 0
    self.stride = stride
    self.sample = []

  def update(self, x):
    x2 = x.reshape(-1, x.shape[-1])
    if self.h is not None:
      self.h = hessian_lib.hessian_update(self.h, x2)
    xa = jnp.abs(x2.astype(jnp.float32))
    self.abs_sum = self.abs_sum + jnp.sum(xa, axis=0)
    self.abs_max = jnp.maximum(self.abs_max, jnp.max(xa, axis=0))
    first = -self.count % self.stride  # the stream's every stride-th token, across batch boundaries
    self.sample.append(x2[first::self.stride].astype(jnp.float32))
    self.count += x2.shape[0]

  @property
  def act_mean(self):
    return self.abs_sum / self.count

  @property
  def x_sub(self):
    return jnp.concatenate(self.sample)[:CLIP_TOKENS]


def _to_layout(q2: qarray.QArray, w, axis: int, group) -> qarray.QArray:
  """The QArray of a 2-D view [in, out] of `w` re-laid as `quantize(w, fmt, axis=axis, group_size=group)`.

  axis 0 (kernels [D, ...]): the stored arrays only change shape. wo [H, K, D] along axis 1 (group | K): the
  2-D view [H·K, D] stores (D, H, …) blocks, the target (H, D, …): the two leading axes are swapped.
  """
  target = jax.eval_shape(lambda v: quantize(v, q2.fmt, axis=axis, group_size=group), jax.ShapeDtypeStruct(
      w.shape, w.dtype))

  def conv(a, t):
    if a is None:
      return None
    if axis == 0:
      return a.reshape(t.shape)
    a = a.reshape(a.shape[0], w.shape[0], -1, a.shape[-1])
    return jnp.swapaxes(a, 0, 1).reshape(t.shape)

  return qarray.QArray(conv(q2.values, target.values), conv(q2.scales, target.scales),
                       conv(q2.zero_points, target.zero_points), q2.scale2, q2.fmt, axis, target.group_size,
                       tuple(w.shape), jnp.dtype(w.dtype).name, target.blocked_shape)


def _read(var):
  return var.get_value() if hasattr(var, "get_value") else var.value


def _write(var, value):
  if hasattr(var, "set_value"):  # flax >= 0.12 deprecates the .value setter
    var.set_value(value)
  else:
    var.value = value


def _get(block, path):
  obj = block
  for part in path.split("/"):
    obj = getattr(obj, part)
  return obj


def _fold(block, name, s, kv_eq_h):
  """Folds the AWQ scale s of input `name` into the block's Params (exact in full precision)."""
  if name == "qkv":
    _write(block.attn_norm.scale, fold_scale(_read(block.attn_norm.scale), s))
  elif name == "up":
    _write(block.mlp_norm.scale, fold_scale(_read(block.mlp_norm.scale), s))
  elif name == "down":
    _write(block.mlp.w3, fold_scale(_read(block.mlp.w3), s))
  elif name == "o" and kv_eq_h:
    _write(block.attn.wv, fold_scale(_read(block.attn.wv), s))
  else:
    return False
  for path in calib_block.KERNELS[name]:
    p = _get(block, path)
    _write(p, scale_input(_read(p), s))
  return True


def _quantize_block(block, stats, method, fmt, *, group_size, act_order, damp, grid, clip, label):
  """{kernel path in the block: QArray}; with AWQ the block's Params are folded in place first."""
  cfg = block.attn.cfg
  kv_eq_h = cfg.KV == cfg.H
  out = {}
  for name in ("o", "qkv", "down", "up"):  # folds o, down rescale wv, w3: before those are quantized
    st = stats[name]
    paths = calib_block.KERNELS[name]
    ws = [_read(_get(block, p)) for p in paths]
    n_in = st.abs_sum.shape[0]
    g = _fit_group(n_in if name != "o" else cfg.head_dim, group_size)
    g2 = cfg.head_dim if (name == "o" and g == "channel") else g  # wo: groups never span two heads
    w2s = [w.reshape(n_in, -1) for w in ws]
    s = jnp.ones((n_in,), jnp.float32)
    if method in ("awq", "awq+gptq") and (name != "o" or kv_eq_h):
      losses = scale_search_losses(w2s, st.x_sub, fmt, group_size=g2, grid=grid, act_mean=st.act_mean)
      s = awq_scales(st.act_mean, jnp.argmin(losses).astype(jnp.float32) / grid)
      _fold(block, name, s, kv_eq_h)
      ws = [_read(_get(block, p)) for p in paths]
      w2s = [w.reshape(n_in, -1) for w in ws]
    for path, w, w2 in zip(paths, ws, w2s):
      full = f"{label}/{path}"
      if method == "awq":
        _, q2 = awq(w2, st.x_sub / s, fmt, group_size=g2, grid=1, clip=clip)
      elif method == "fp_search":
        q2 = fp_search(w2, hessian=st.h.hessian, group_size=g2, **search_space(fmt))
      else:
        h = st.h.hessian / (s[:, None] * s[None, :])
        q2 = gptq(w2, h, fmt, group_size=g2, act_order=act_order,
                           static_groups=act_order and g2 != "channel", damp=damp, name=full)
      axis = 1 if name == "o" else 0
      out[path] = _to_layout(q2, w, axis, g if name == "o" else g2)
  return out


def calibrated_quantize(model, tokens, method: str, fmt, *, group_size=128, act_order: bool = False,
                        seq_len: int | None = None, batch_size: int = 8, propagate: str = "quantized",
                        damp: float = 0.01, grid: int = 20, clip: bool = True):
  """A copy of `model` (a `cce_jax.models.Decoder`) whose block kernels hold QArrays calibrated on `tokens`.

  Args:
    model: the full-precision Decoder (left unchanged).
    tokens: calibration ids: a 1-D stream (cut into windows of `seq_len`, default the model's T) or [N, T].
    method: "gptq", "awq" or "awq+gptq" (module docstring).
    fmt: a format name or `Format` (GPTQ: the integer formats).
    group_size: an int (fitted to each input axis), "channel" or None (per output channel).
    act_order: GPTQ's descending-diag(H) order (static groups with an int group size).
    batch_size: windows per calibration forward.
    propagate: "quantized" (default) or "full": which outputs of block k feed block k + 1.
    damp, grid, clip: GPTQ's damping; AWQ's scale grid and clip search.

  Returns a new Decoder: kernels are QArrays laid out as the RTN recipes lay them out; with AWQ the RMSNorm scales
  and w3 (and wv when KV == H) hold the folded full-precision values. Embeddings and the head are unchanged.
  """
  if method not in METHODS:
    raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
  if propagate not in PROPAGATE:
    raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
  fmt = base.get_format(fmt)
  windows = calibration_windows(tokens, seq_len or model.cfg.T)
  model = nnx.clone(model)
  n_tokens = windows.size
  stride = max(1, math.ceil(n_tokens / CLIP_TOKENS))
  pos = jnp.broadcast_to(jnp.arange(windows.shape[1]), (min(batch_size, len(windows)), windows.shape[1]))
  xs = [model.embed_tokens(jnp.asarray(windows[i:i + batch_size])) for i in range(0, len(windows), batch_size)]
  quantized = {}
  for k, block in enumerate(model.blocks):
    stats = None
    for x in xs:
      _, inputs = calib_block.jitted_pieces(block, x, pos[:x.shape[0]])
      if stats is None:
        stats = {n: _Stats(v.shape[-1], stride, method != "awq") for n, v in inputs.items()}
      for n, v in inputs.items():
        stats[n].update(v)
    qs = _quantize_block(block, stats, method, fmt, group_size=group_size, act_order=act_order, damp=damp,
                         grid=grid, clip=clip, label=f"blocks/{k}")
    if propagate == "full":
      xs = [calib_block.jitted_pieces(block, x, pos[:x.shape[0]])[0] for x in xs]
    for path, q in qs.items():
      _write(_get(block, path), q.dequantize())
      quantized[f"blocks/{k}/{path}"] = q
    if propagate == "quantized":
      xs = [calib_block.jitted_pieces(block, x, pos[:x.shape[0]])[0] for x in xs]
  graphdef, state = nnx.split(model)
  flat = []
  for path, var in nnx.to_flat_state(state):
    key = "/".join(str(p) for p in path)
    flat.append((path, var.replace(quantized[key]) if key in quantized else var))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def calibration_stats(model, tokens, *, seq_len: int | None = None, batch_size: int = 8) -> dict:
  """{"blocks/k/<input>": {"hessian", "act_mean", "act_max", "count"}} of the full-precision model (module
  docstring; inputs "qkv", "o", "up", "down"), accumulated block by block on full-precision outputs."""
  windows = calibration_windows(tokens, seq_len or model.cfg.T)
  stride = max(1, math.ceil(windows.size / CLIP_TOKENS))
  pos = jnp.broadcast_to(jnp.arange(windows.shape[1]), (min(batch_size, len(windows)), windows.shape[1]))
  xs = [model.embed_tokens(jnp.asarray(windows[i:i + batch_size])) for i in range(0, len(windows), batch_size)]
  out = {}
  for k, block in enumerate(model.blocks):
    stats, nxt = None, []
    for x in xs:
      y, inputs = calib_block.jitted_pieces(block, x, pos[:x.shape[0]])
      nxt.append(y)
      if stats is None:
        stats = {n: _Stats(v.shape[-1], stride, True) for n, v in inputs.items()}
      for n, v in inputs.items():
        stats[n].update(v)
    xs = nxt
    for n, st in stats.items():
      out[f"blocks/{k}/{n}"] = {"hessian": st.h.hessian, "act_mean": st.act_mean, "act_max": st.abs_max,
                                "count": st.count}
  return out
