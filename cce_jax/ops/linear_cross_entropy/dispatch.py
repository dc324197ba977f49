"""The op's one internal entry point, shared by `api` (the public signatures) and `sharded` (the op inside
`jax.shard_map`): argument checks, the target shift, the backend and its tile config, the per-token losses with
their weights, and the reduction.

`cross_entropy` and `logprobs` take every option of `api.linear_cross_entropy` and `api.token_logprobs` (all
keyword-only, no defaults: the public signatures hold them), plus `vocab_split`: None, or this device's part of a
classifier split over mesh axes (set by `sharded`), whose per-token statistics are merged over the mesh.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cce_jax.ops.linear_cross_entropy import forward_gradient
from cce_jax.ops.linear_cross_entropy import manual_axes
from cce_jax.ops.linear_cross_entropy import pallas_gpu
from cce_jax.ops.linear_cross_entropy import pallas_tpu
from cce_jax.ops.linear_cross_entropy import reference
from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy import validation
from cce_jax.ops.linear_cross_entropy import xla_chunked
from cce_jax.ops.linear_cross_entropy import xla_fused
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig

# Triton's dot needs every tile dimension >= 16; "auto" leaves smaller problems to XLA.
_PALLAS_GPU_MIN_DIM = 16


class VocabSplit(NamedTuple):
  """The classifier's rows split over mesh axes (inside `jax.shard_map`, from `cce_jax.sharded`): this device
  holds rows [offset, offset + V_local) of the `vocab_size` rows."""

  axes: tuple
  offset: jax.Array
  vocab_size: int


def cross_entropy(e, c, targets, *, bias, ignore_index, softcap, reduction, shift, label_smoothing, weights, z_loss,
                  return_lse, filter_eps, exact, implementation, config, interpret, vocab_split):
  """`api.linear_cross_entropy` (see there), computed over this device's classifier rows when `vocab_split`."""
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
  targets = shift_targets(targets, shift, ignore_index)
  e_NxD, targets_N = e.reshape(-1, e.shape[-1]), targets.reshape(-1)
  valid_N = targets_N != ignore_index
  if backend_name == "xla_fused":
    if vocab_split is not None:
      raise ValueError("implementation='xla_fused' does not take a vocabulary split; use 'xla_chunked'")
    return _fused_loss(e_NxD, c, bias, manual_axes.vary(targets_N, names), valid_N, weights, reduction=reduction,
                       softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss, exact=exact,
                       return_lse=return_lse, config=config)
  backend, backend_kwargs = _backend(backend_name, implementation, config, interpret, e_NxD.shape, c.shape,
                                     softcap, filtered=filter_eps is not None and not exact)
  if (backend is pallas_gpu and reduction != "none" and not return_lse and vocab_split is None and not exact
      and filter_eps is None and forward_gradient.applies(backend_kwargs["config"], interpret, e_NxD, c, bias,
                                                          softcap=softcap, label_smoothing=label_smoothing)):
    coef_N = _reduction_coefficients(targets_N, valid_N, weights, c.shape[0], reduction)
    return forward_gradient.reduced_loss(e_NxD, c, manual_axes.vary(targets_N, names), coef_N, softcap=softcap,
                                         label_smoothing=label_smoothing, z_loss=z_loss, interpret=interpret,
                                         config=backend_kwargs["config"])
  backend_kwargs.update(_split_kwargs(vocab_split, backend, backend_kwargs.get("config"), with_vocab_size=True))
  loss_N, lse_N = backend.cross_entropy_per_token(
      e_NxD, c, bias, _backend_targets(targets_N, vocab_split, names), valid_N, softcap=softcap,
      label_smoothing=label_smoothing, z_loss=z_loss, filter_eps=filter_eps, exact=exact, **backend_kwargs)
  vocab_size = c.shape[0] if vocab_split is None else vocab_split.vocab_size
  loss_N = loss_N * _nan_where_out_of_range(targets_N, valid_N, vocab_size, loss_N.dtype)

  weights_N = token_weights(valid_N, weights, loss_N.dtype)
  loss_N = loss_N * weights_N
  if reduction == "none":
    loss = loss_N.reshape(batch_shape)
  elif reduction == "sum":
    loss = jnp.sum(loss_N)
  else:
    loss = jnp.sum(loss_N) / mean_divisor(jnp.sum(weights_N))
  return (loss, lse_N.reshape(batch_shape)) if return_lse else loss


def logprobs(e, c, targets, *, bias, temperature, softcap, ignore_index, shift, return_entropy, exact,
             implementation, config, interpret, vocab_split):
  """`api.token_logprobs` (see there), computed over this device's classifier rows when `vocab_split`."""
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
  targets = shift_targets(targets, shift, ignore_index)
  e_NxD, targets_N = e.reshape(-1, e.shape[-1]), targets.reshape(-1)
  valid_N = targets_N != ignore_index
  backend, backend_kwargs = _backend(backend_name, implementation, config, interpret, e_NxD.shape, c.shape,
                                     softcap)
  backend_kwargs.update(_split_kwargs(vocab_split, backend, backend_kwargs.get("config")))
  logp_N, entropy_N = backend.logprobs_per_token(
      e_NxD, c, bias, _backend_targets(targets_N, vocab_split, names), softcap=softcap, temperature=temperature,
      exact=exact, **backend_kwargs)
  logp_N = jnp.where(valid_N, logp_N, 0.0)
  vocab_size = c.shape[0] if vocab_split is None else vocab_split.vocab_size
  logp_N = logp_N * _nan_where_out_of_range(targets_N, valid_N, vocab_size, logp_N.dtype)
  logp = logp_N.reshape(batch_shape)
  return (logp, entropy_N.reshape(batch_shape)) if return_entropy else logp


def _fused_loss(e_NxD, c, bias, targets_N, valid_N, weights, *, reduction, softcap, label_smoothing, z_loss, exact,
                return_lse, config):
  """The "xla_fused" path: the reduced loss, with per-token coefficients formed here (weights, mean, NaN for bad
  targets) so that the gradient can be computed in the forward pass."""
  if reduction == "none" or return_lse:
    raise ValueError("implementation='xla_fused' forms the gradient of a reduced loss in the forward pass: it "
                     f"needs reduction='mean' or 'sum' and return_lse=False (got reduction={reduction!r}, "
                     f"return_lse={return_lse})")
  n, v = e_NxD.shape[0], c.shape[0]
  if n == 0:
    return jnp.zeros((), jnp.float32)
  coef_N = _reduction_coefficients(targets_N, valid_N, weights, v, reduction)
  return xla_fused.reduced_loss(e_NxD, c, bias, targets_N, coef_N, softcap=softcap,
                                label_smoothing=label_smoothing, z_loss=z_loss, exact=exact,
                                config=(config or xla_fused.default_config(n, v)).clamped(n, v))


def _reduction_coefficients(targets_N, valid_N, weights, vocab_size, reduction):
  """Each token's coefficient [N] fp32 in a reduced loss: its weight (0 if ignored; over the weight sum for
  "mean"), NaN for a scored token whose target is outside [0, V)."""
  weights_N = token_weights(valid_N, weights, jnp.float32)
  coef_N = weights_N * _nan_where_out_of_range(targets_N, valid_N, vocab_size, jnp.float32)
  return coef_N / mean_divisor(jnp.sum(weights_N)) if reduction == "mean" else coef_N


def token_weights(valid_N, weights, dtype):
  """Each token's weight in the reduced loss [N]: `weights` (or 1) where the token is scored, else 0."""
  if weights is None:
    return valid_N.astype(dtype)
  return jnp.where(valid_N, weights.reshape(-1).astype(dtype), 0.0)


def scored_weight(targets, weights, *, shift, ignore_index):
  """The sum of the scored tokens' weights (their count without weights), fp32: the "mean" reduction's divisor
  before `mean_divisor`. targets [*B] int, weights [*B] or None, as the op takes them."""
  valid_N = shift_targets(targets, shift, ignore_index).reshape(-1) != ignore_index
  return jnp.sum(token_weights(valid_N, weights, jnp.float32))


def mean_divisor(total):
  """The "mean" reduction's divisor from the sum of the scored tokens' weights: that sum, or 1 where it is 0 (so
  that a mean over no scored token is 0)."""
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
  if name == "pallas_tpu":
    return pallas_tpu, {"config": config or PallasTpuConfig.for_shape(n, v, d), "interpret": interpret}
  return reference, {}


def _split_kwargs(split, backend, config, with_vocab_size=False):
  """The backend's keyword arguments for a vocabulary split: merge the per-shard statistics over its axes."""
  if split is None:
    return {}
  if backend not in (xla_chunked, pallas_gpu, pallas_tpu):
    raise ValueError("a vocabulary split needs a blockwise implementation ('xla_chunked', 'pallas_gpu' or "
                     "'pallas_tpu'); "
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


def shift_targets(targets, shift, ignore_index):
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
