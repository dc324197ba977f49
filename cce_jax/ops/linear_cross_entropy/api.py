"""Public entry points: `linear_cross_entropy` and `token_logprobs`."""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import pallas_gpu
from cce_jax.ops.linear_cross_entropy import reference
from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy import validation
from cce_jax.ops.linear_cross_entropy import xla_chunked
from cce_jax.ops.linear_cross_entropy import xla_fused
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig
from cce_jax.typing import Array, Float, Int

_BACKENDS = {"reference": reference, "xla_chunked": xla_chunked, "pallas_gpu": pallas_gpu}
# Triton's dot needs every tile dimension >= 16; "auto" leaves smaller problems to XLA.
_PALLAS_GPU_MIN_DIM = 16


def linear_cross_entropy(
    e: Float[Array, "*B D"],
    c: Float[Array, "V D"],
    targets: Int[Array, "*B"],
    *,
    bias: Float[Array, "V"] | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    shift: int = 0,
    label_smoothing: float = 0.0,
    weights: Float[Array, "*B"] | None = None,
    z_loss: float = 0.0,
    return_lse: bool = False,
    filter_eps: float | Literal["auto"] | None = "auto",
    exact: bool = False,
    implementation: str | None = "auto",
    config: XlaChunkedConfig | None = None,
    interpret: bool = False,
    _vocab_split: VocabSplit | None = None,
):
  """Cross-entropy of softmax(e @ c.T + bias) against integer targets, without materialising the logits.

  The logits `z = e @ c.T (+ bias)`, optionally softcapped to `softcap * tanh(z / softcap)`, exist only one
  [block_n, block_v] tile at a time; the forward keeps the fp32 log-sum-exp per token for the backward, which
  recomputes the tiles (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models").

  Per token, with s the (softcapped) logits, lse = logsumexp(s) and α = label_smoothing:
    loss = (1 - α)·(lse - s[t]) + α·(lse - mean(s)) + z_loss·lse²
  i.e. the cross-entropy against (1 - α)·onehot(t) + α/V (optax / PyTorch label smoothing) plus the z-loss.

  Shapes: e [*B, D], c [V, D], targets [*B] (any number of leading dims, including none), bias [V],
  weights [*B]. With shift=k > 0, position i of the last leading axis is trained on targets[..., i + k] (the
  targets are shifted, e is not copied); the last k positions have no target and count as ignored.

  Dtype policy: e and c may be bf16, f16, f32 (or f64, for checks) and may differ; logits, softmax and all
  accumulation are fp32 (f64 for f64 inputs); the loss and the LSE are fp32; gradients come back in the dtype of
  the input they belong to. Every GEMM takes its operands in the inputs' (promoted) dtype, the backward's
  d(logits) included, and accumulates in fp32. `exact=True` asks for HIGHEST matmul precision (no TF32 for f32
  inputs), no gradient filtering and a deterministic backward.

  Targets outside [0, V) that are not `ignore_index` make that token's loss NaN (and, through it, the reduced
  loss and the gradients): a bad label is never silently scored. NaN or Inf in e, c or bias propagate to the
  loss of the tokens they reach.

  Args:
    e: [*B, D] hidden states.
    c: [V, D] classifier (unembedding) matrix.
    targets: [*B] integer targets in [0, V), or `ignore_index`.
    bias: optional [V] classifier bias.
    ignore_index: target value whose tokens contribute no loss and no gradient.
    softcap: optional cap > 0 of Gemma-2-style logit softcapping.
    reduction: "mean" (over non-ignored tokens, or weighted: sum(w·loss) / sum(w) over non-ignored tokens;
      0 when that is empty), "sum" (sum of w·loss) or "none" (per-token w·loss of shape [*B], 0 at ignored
      positions).
    shift: k >= 0; train position i on target i + k along the last leading axis.
    label_smoothing: α in [0, 1).
    weights: optional [*B] per-position weights (aligned with the output positions, i.e. with e).
    z_loss: coefficient >= 0 of the auxiliary z-loss z_loss·lse² (PaLM), added per non-ignored token.
    return_lse: also return the per-token LSE [*B] (fp32, differentiable; computed at every position).
    filter_eps: gradient filtering: a tile whose |softmax - onehot| is below this everywhere skips its gradient
      GEMMs (the backend's tile; pallas_gpu's dense fallback on Hopper zeroes each 128-entry row of a
      tile). "auto": 2^-12 for 16-bit inputs without label smoothing, else off. None: off.
    exact: HIGHEST matmul precision, no gradient filtering, bitwise deterministic run to run.
    implementation: "auto" (best available: "pallas_gpu" on NVIDIA GPUs, else "xla_chunked"), "pallas_gpu"
      (Triton kernels), "xla_chunked" (blockwise XLA, any platform), "xla_fused" (XLA over row blocks of
      logits with the gradient formed in the forward pass: three GEMMs instead of four, an fp32 [V, D]
      accumulator, no filtering; reduction "mean"/"sum" only, no return_lse), "reference" (materialised logits,
      for tests), "pallas_tpu" (not available yet).
    config: tile sizes: an `XlaChunkedConfig` for "xla_chunked" and "xla_fused" (rows per block: block_n), a
      `PallasGpuConfig` for "pallas_gpu" (default: the config class's `for_shape`).
    interpret: run Pallas kernels in the interpreter (CPU testing of the Pallas implementations).
    _vocab_split: internal, set by `cce_jax.sharded` inside shard_map: c holds this device's rows of a split
      vocabulary, and the statistics are merged over the mesh.

  Returns:
    The loss (fp32 scalar, or [*B] for reduction="none"), and the LSE [*B] when `return_lse`.
  """
  e, c, targets, bias, weights = validation.check_arrays(e, c, targets, bias, weights)
  names = manual_axes.axes(e, c, targets, bias, weights)
  e, c, bias = manual_axes.vary((e, c, bias), names)
  ignore_index = validation.static_number("ignore_index", ignore_index, integer=True)
  softcap = validation.static_number("softcap", softcap, low=0.0, low_inclusive=False, allow_none=True)
  if reduction not in validation.REDUCTIONS:
    raise ValueError(f"reduction must be one of {validation.REDUCTIONS}, got {reduction!r}")
  shift = validation.static_number("shift", shift, low=0, integer=True)
  label_smoothing = validation.static_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
  z_loss = validation.static_number("z_loss", z_loss, low=0.0)
  if not isinstance(return_lse, bool) or not isinstance(exact, bool):
    raise TypeError(f"return_lse and exact must be bools, got {return_lse!r}, {exact!r}")
  backend_name = validation.resolve_implementation(implementation, interpret, config,
                                                  platform=jax.default_backend())
  if backend_name == "xla_fused" and filter_eps not in ("auto", None):
    raise ValueError(f"implementation='xla_fused' does not filter gradients; got filter_eps={filter_eps!r}")
  filter_eps = validation.resolve_filter_eps(
      filter_eps, exact=exact, label_smoothing=label_smoothing, compute_dtype=jnp.result_type(e, c))

  batch_shape = targets.shape
  targets = _shift_targets(targets, shift, ignore_index)
  e_ND, targets_N = e.reshape(-1, e.shape[-1]), targets.reshape(-1)
  valid_N = targets_N != ignore_index
  if backend_name == "xla_fused":
    if _vocab_split is not None:
      raise ValueError("implementation='xla_fused' does not take a vocabulary split; use 'xla_chunked'")
    return _fused_loss(e_ND, c, bias, manual_axes.vary(targets_N, names), valid_N, weights, reduction=reduction,
                       softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss, exact=exact,
                       return_lse=return_lse, config=config)
  backend, backend_kwargs = _backend(backend_name, implementation, config, interpret, e_ND.shape, c.shape,
                                     softcap, filtered=filter_eps is not None and not exact)
  backend_kwargs.update(_split_kwargs(_vocab_split, backend, backend_kwargs.get("config"), with_vocab_size=True))
  loss_N, lse_N = backend.cross_entropy_per_token(
      e_ND, c, bias, _backend_targets(targets_N, _vocab_split, names), valid_N, softcap=softcap,
      label_smoothing=label_smoothing, z_loss=z_loss, filter_eps=filter_eps, exact=exact, **backend_kwargs)
  vocab_size = c.shape[0] if _vocab_split is None else _vocab_split.vocab_size
  loss_N = loss_N * _nan_where_out_of_range(targets_N, valid_N, vocab_size, loss_N.dtype)

  weights_N = _token_weights(valid_N, weights, loss_N.dtype)
  loss_N = loss_N * weights_N
  if reduction == "none":
    loss = loss_N.reshape(batch_shape)
  elif reduction == "sum":
    loss = jnp.sum(loss_N)
  else:
    loss = jnp.sum(loss_N) / _mean_divisor(weights_N)
  return (loss, lse_N.reshape(batch_shape)) if return_lse else loss


def token_logprobs(
    e: Float[Array, "*B D"],
    c: Float[Array, "V D"],
    targets: Int[Array, "*B"],
    *,
    bias: Float[Array, "V"] | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: int = 0,
    return_entropy: bool = False,
    exact: bool = False,
    implementation: str | None = "auto",
    config: XlaChunkedConfig | None = None,
    interpret: bool = False,
    _vocab_split: VocabSplit | None = None,
):
  """Per-token log p(target) (and entropy) under softmax(f(e @ c.T + bias) / temperature), without the logits.

  For RL and preference losses (PPO, GRPO, DPO): f is the optional softcap; both outputs are differentiable with
  respect to e, c and bias. Same machinery, shapes and dtype policy as `linear_cross_entropy`: fp32
  accumulation, fp32 outputs, gradients in the inputs' dtypes; no gradient filtering.

  Args:
    e: [*B, D] hidden states.
    c: [V, D] classifier.
    targets: [*B] integer targets in [0, V), or `ignore_index` (log-prob 0 there; the entropy is still computed).
      Other targets outside [0, V) give NaN.
    bias: optional [V] bias.
    temperature: > 0; logits are divided by it after the softcap.
    softcap: optional cap > 0.
    ignore_index: target value to skip.
    shift: k >= 0; score position i against targets[..., i + k] (the last k positions are ignored).
    return_entropy: also return the entropy [*B] of each position's distribution (nats).
    exact: HIGHEST matmul precision, bitwise deterministic run to run.
    implementation, config, interpret, _vocab_split: as in `linear_cross_entropy`.

  Returns:
    logprobs [*B] fp32, and entropy [*B] fp32 when `return_entropy`.
  """
  e, c, targets, bias, _ = validation.check_arrays(e, c, targets, bias)
  names = manual_axes.axes(e, c, targets, bias)
  e, c, bias = manual_axes.vary((e, c, bias), names)
  temperature = validation.static_number("temperature", temperature, low=0.0, low_inclusive=False)
  softcap = validation.static_number("softcap", softcap, low=0.0, low_inclusive=False, allow_none=True)
  ignore_index = validation.static_number("ignore_index", ignore_index, integer=True)
  shift = validation.static_number("shift", shift, low=0, integer=True)
  if not isinstance(return_entropy, bool) or not isinstance(exact, bool):
    raise TypeError(f"return_entropy and exact must be bools, got {return_entropy!r}, {exact!r}")
  backend_name = validation.resolve_implementation(implementation, interpret, config,
                                                  platform=jax.default_backend())
  if backend_name == "xla_fused":
    raise ValueError("implementation='xla_fused' computes reduced losses only; token_logprobs takes 'auto', "
                     "'pallas_gpu', 'xla_chunked' or 'reference'")

  batch_shape = targets.shape
  targets = _shift_targets(targets, shift, ignore_index)
  e_ND, targets_N = e.reshape(-1, e.shape[-1]), targets.reshape(-1)
  valid_N = targets_N != ignore_index
  backend, backend_kwargs = _backend(backend_name, implementation, config, interpret, e_ND.shape, c.shape,
                                     softcap)
  backend_kwargs.update(_split_kwargs(_vocab_split, backend, backend_kwargs.get("config")))
  logp_N, entropy_N = backend.logprobs_per_token(
      e_ND, c, bias, _backend_targets(targets_N, _vocab_split, names), softcap=softcap, temperature=temperature,
      exact=exact, **backend_kwargs)
  logp_N = jnp.where(valid_N, logp_N, 0.0)
  vocab_size = c.shape[0] if _vocab_split is None else _vocab_split.vocab_size
  logp_N = logp_N * _nan_where_out_of_range(targets_N, valid_N, vocab_size, logp_N.dtype)
  logp = logp_N.reshape(batch_shape)
  return (logp, entropy_N.reshape(batch_shape)) if return_entropy else logp


def _fused_loss(e_ND, c, bias, targets_N, valid_N, weights, *, reduction, softcap, label_smoothing, z_loss, exact,
                return_lse, config):
  """The "xla_fused" path: the reduced loss, with per-token coefficients formed here (weights, mean, NaN for bad
  targets) so that the gradient can be computed in the forward pass."""
  if reduction == "none" or return_lse:
    raise ValueError("implementation='xla_fused' forms the gradient of a reduced loss in the forward pass: it "
                     f"needs reduction='mean' or 'sum' and return_lse=False (got reduction={reduction!r}, "
                     f"return_lse={return_lse})")
  n, v = e_ND.shape[0], c.shape[0]
  if n == 0:
    return jnp.zeros((), jnp.float32)
  weights_N = _token_weights(valid_N, weights, jnp.float32)
  coef_N = weights_N * _nan_where_out_of_range(targets_N, valid_N, v, jnp.float32)
  if reduction == "mean":
    coef_N = coef_N / _mean_divisor(weights_N)
  return xla_fused.reduced_loss(e_ND, c, bias, targets_N, coef_N, softcap=softcap,
                                label_smoothing=label_smoothing, z_loss=z_loss, exact=exact,
                                config=(config or xla_fused.default_config(n, v)).clamped(n, v))


def _token_weights(valid_N, weights, dtype):
  """Each token's weight in the reduced loss [N]: `weights` (or 1) where the token is scored, else 0."""
  if weights is None:
    return valid_N.astype(dtype)
  return jnp.where(valid_N, weights.reshape(-1).astype(dtype), 0.0)


def _mean_divisor(weights_N):
  """sum(weights_N), or 1 when it is 0 (a mean over no scored token is 0)."""
  total = jnp.sum(weights_N)
  return jnp.where(total == 0, 1.0, total)


def _backend(name, requested, config, interpret, e_shape, c_shape, softcap, filtered=False):
  """The backend module and its keyword arguments (tile config, interpreter flag) for these shapes."""
  (n, d), v = e_shape, c_shape[0]
  if n == 0:
    return reference, {}
  if name == "pallas_gpu" and not interpret and min(n, v, d) < _PALLAS_GPU_MIN_DIM:
    if requested not in (None, "auto"):
      raise ValueError(
          f"implementation='pallas_gpu' needs N, V and D >= {_PALLAS_GPU_MIN_DIM} (Triton's dot); got N={n}, "
          f"V={v}, D={d}. implementation='auto' runs such shapes with 'xla_chunked'")
    name, config = "xla_chunked", None
  if name == "xla_chunked":
    return xla_chunked, {"config": (config or XlaChunkedConfig.for_shape(n, v, d)).clamped(n, v)}
  if name == "pallas_gpu":
    config = (config or PallasGpuConfig.for_shape(n, v, d, softcap=softcap, filtered=filtered)).clamped(n, v, d)
    return pallas_gpu, {"config": config, "interpret": interpret}
  return reference, {}


class VocabSplit(NamedTuple):
  """The classifier's rows split over mesh axes (inside `jax.shard_map`, from `cce_jax.sharded`): this device
  holds rows [offset, offset + V_local) of the `vocab_size` rows."""

  axes: tuple
  offset: jax.Array
  vocab_size: int


def _split_kwargs(split, backend, config, with_vocab_size=False):
  """The backend's keyword arguments for a vocabulary split: merge the per-shard statistics over its axes."""
  if split is None:
    return {}
  if backend not in (xla_chunked, pallas_gpu):
    raise ValueError("a vocabulary split needs a blockwise implementation ('xla_chunked' or 'pallas_gpu'); "
                     f"got {backend.__name__.rsplit('.', 1)[-1]!r}")
  if getattr(config, "low_memory", False):
    raise ValueError("PallasGpuConfig(low_memory=True) does not take a vocabulary split: its keep mask drops the "
                     "rows whose target lives on another device")
  kwargs = {"combine": functools.partial(stats_losses.merge_vocab_shards, axes=split.axes)}
  if with_vocab_size:
    kwargs["vocab_size"] = split.vocab_size
  return kwargs


def _backend_targets(targets_N, split, names):
  """The targets as the backend sees them: relative to this device's vocabulary rows under a split (other rows'
  targets then match no column), varying over the inputs' mesh axes."""
  if split is not None:
    targets_N = targets_N - split.offset.astype(targets_N.dtype)
  return manual_axes.vary(targets_N, names)


def _shift_targets(targets, shift, ignore_index):
  """targets[..., i + shift] at position i; ignore_index where i + shift runs past the end."""
  if shift == 0:
    return targets
  if targets.ndim == 0:
    raise ValueError("shift > 0 needs targets with a sequence axis (targets.ndim >= 1), got a scalar")
  length = targets.shape[-1]
  kept = targets[..., min(shift, length):]
  pad = jnp.full(targets.shape[:-1] + (length - kept.shape[-1],), ignore_index, targets.dtype)
  return jnp.concatenate([kept, pad], axis=-1)


def _nan_where_out_of_range(targets_N, valid_N, vocab_size, dtype):
  """A per-token factor: NaN for scored tokens whose target is outside [0, V), else 1."""
  bad_N = valid_N & ((targets_N < 0) | (targets_N >= vocab_size))
  return jnp.where(bad_N, jnp.nan, 1.0).astype(dtype)
