"""The fused loss over a device mesh: the tokens split across it (data parallelism), the classifier's rows
(vocabulary parallelism), or both.

Under `jit`, XLA partitions a materialised loss by itself but not the custom calls of the Pallas kernels: given
token-sharded inputs, it gathers every input onto every device, and each device computes the whole batch's loss.
(Two H100s, N = 16384, D = 2048, V = 128256, loss + gradient: 61 ms that way, against 56 ms on one GPU and 29 ms
split; `xla_chunked`'s scans fare worse, 858 ms.) The functions here run the op inside `jax.shard_map`. Each
device takes its own tokens and the whole classifier. A reduced loss is summed over the mesh, and the transpose of
that sum adds up the replicated classifier's gradient.

With the vocabulary split, each device computes the per-token statistics (LSE, target logit, logit sum, mean
logit) over its rows, and `stats_losses.merge_vocab_shards` merges them over the mesh: an all-reduce of a few
[N] vectors instead of the [V, D] classifier's all-gather. The gradient reaches each shard's kernels through the
merge, and dE is summed over the vocabulary axes.
"""

from __future__ import annotations

import inspect
import math

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from cce_jax.ops.linear_cross_entropy import api
from cce_jax.ops.linear_cross_entropy import dispatch
from cce_jax.ops.linear_cross_entropy import validation

try:
  from jax import shard_map
except ImportError:  # older jax
  from jax.experimental.shard_map import shard_map


def linear_cross_entropy(e, c, targets, *, mesh, batch_axes=(), vocab_axes=(), bias=None, weights=None,
                         reduction="mean", ignore_index=-100, shift=0, return_lse=False, **kwargs):
  """`cce_jax.linear_cross_entropy` with the leading axis of e, targets and weights split over `batch_axes`, and
  the rows of c and bias over `vocab_axes`.

  Args:
    e: [B, ..., D] hidden states, targets: [B, ...], weights: [B, ...] or None; their leading axis B is split
      over the mesh axes `batch_axes` (if any), and must be divisible by the product of their sizes.
    c: [V, D] and bias: [V] or None: split along V over `vocab_axes` (V divisible by the product of their
      sizes), else replicated. A vocabulary split needs implementation "xla_chunked", "pallas_gpu" or "auto".
    mesh: a `jax.sharding.Mesh`. batch_axes, vocab_axes: axis names of it (one, or a tuple; disjoint; at least one
      axis in all).
    reduction: as for the op. "mean" divides by the scored tokens (or their weights) of the whole mesh.
    shift: as for the op, along the last axis of targets. That axis must not be the split one: targets.ndim >= 2
      when shift > 0.
    **kwargs: the op's other options (softcap, label_smoothing, z_loss, filter_eps, exact, implementation,
      config, interpret).

  Returns:
    As the op. A reduced loss is replicated; per-token losses and the LSE are split like targets.
  """
  axes, vocab = _axes(batch_axes), _axes(vocab_axes)
  if reduction not in validation.REDUCTIONS:
    raise ValueError(f"reduction must be one of {validation.REDUCTIONS}, got {reduction!r}")
  _check_split(mesh, axes, vocab, e, c, targets, weights, shift)
  tok, rows = P(axes or None), P(vocab or None)
  local_reduction = "none" if reduction == "none" else "sum"

  options = _op_options(api.linear_cross_entropy, linear_cross_entropy, kwargs)

  def local(e, c, targets, bias, weights):
    out = dispatch.cross_entropy(e, c, targets, bias=bias, weights=weights, reduction=local_reduction,
                                 ignore_index=ignore_index, shift=shift, return_lse=return_lse,
                                 vocab_split=_vocab_split(mesh, vocab, c), **options)
    loss, lse = out if return_lse else (out, None)
    if reduction != "none" and axes:
      loss = lax.psum(loss, axes)
    if reduction == "mean":
      total = dispatch.scored_weight(targets, weights, shift=shift, ignore_index=ignore_index)
      loss = loss / dispatch.mean_divisor(lax.psum(total, axes) if axes else total)
    return (loss, lse) if return_lse else loss

  loss_spec = tok if reduction == "none" else P()
  fn = _shard_map(local, options, mesh=mesh, in_specs=(tok, rows, tok, rows, tok),
                  out_specs=(loss_spec, tok) if return_lse else loss_spec)
  return fn(e, c, targets, bias, weights)


def token_logprobs(e, c, targets, *, mesh, batch_axes=(), vocab_axes=(), bias=None, return_entropy=False,
                   ignore_index=-100, shift=0, **kwargs):
  """`cce_jax.token_logprobs` with the leading axis of e and targets split over `batch_axes` and the rows of c and
  bias over `vocab_axes` (see `linear_cross_entropy` here). Returns log p(target) [B, ...] (and the entropy),
  split like targets."""
  axes, vocab = _axes(batch_axes), _axes(vocab_axes)
  _check_split(mesh, axes, vocab, e, c, targets, None, shift)
  tok, rows = P(axes or None), P(vocab or None)
  options = _op_options(api.token_logprobs, token_logprobs, kwargs)
  local = lambda e, c, targets, bias: dispatch.logprobs(
      e, c, targets, bias=bias, return_entropy=return_entropy, ignore_index=ignore_index, shift=shift,
      vocab_split=_vocab_split(mesh, vocab, c), **options)
  fn = _shard_map(local, options, mesh=mesh, in_specs=(tok, rows, tok, rows),
                  out_specs=(tok, tok) if return_entropy else tok)
  return fn(e, c, targets, bias)


def _shard_map(local, options, **kwargs):
  """shard_map of `local`; with interpret=True (Pallas kernels on CPU) without the varying-axes check, which the
  Pallas interpreter does not trace under (its slices mix varying data with program ids)."""
  if options.get("interpret"):
    kwargs["check_vma"] = False
  return shard_map(local, **kwargs)


def _op_options(op, caller, kwargs):
  """The options of the public `op` that `caller` (a function here) does not take itself: `kwargs`, and the op's
  defaults for the others (its signature holds them)."""
  own = inspect.signature(caller).parameters
  params = {name: p for name, p in inspect.signature(op).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in own}
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise TypeError(f"{op.__name__}() got unexpected keyword arguments {unknown}; its options: {sorted(params)}")
  return {name: kwargs.get(name, p.default) for name, p in params.items()}


def _vocab_split(mesh, vocab, c_local):
  """This device's part of a vocabulary split over the mesh axes `vocab` (inside shard_map), or None."""
  if not vocab:
    return None
  v_local = c_local.shape[0]
  return dispatch.VocabSplit(axes=vocab, offset=lax.axis_index(vocab) * v_local,
                        vocab_size=v_local * math.prod(mesh.shape[a] for a in vocab))


def _axes(names) -> tuple:
  return (names,) if isinstance(names, str) else tuple(names or ())


def _check_split(mesh, axes, vocab, e, c, targets, weights, shift):
  """Clear errors, before shard_map's own, for what cannot be split."""
  if not axes and not vocab:
    raise ValueError("name at least one mesh axis in batch_axes or vocab_axes")
  missing = [a for a in axes + vocab if a not in mesh.shape]
  if missing:
    raise ValueError(f"axes {missing} are not axes of the mesh (its axes: {tuple(mesh.shape)})")
  if set(axes) & set(vocab):
    raise ValueError(f"batch_axes {axes} and vocab_axes {vocab} share {sorted(set(axes) & set(vocab))}")
  if vocab and jnp.shape(c)[0] % math.prod(mesh.shape[a] for a in vocab):
    raise ValueError(f"c's {jnp.shape(c)[0]} rows are not divisible by the "
                     f"{math.prod(mesh.shape[a] for a in vocab)} devices of vocab_axes {vocab}")
  if not axes:
    return
  if jnp.ndim(e) < 2 or jnp.ndim(targets) < 1:
    raise ValueError(f"the split needs e [B, ..., D] and targets [B, ...]; got e {jnp.shape(e)}, targets "
                     f"{jnp.shape(targets)}")
  if shift and jnp.ndim(targets) < 2:
    raise ValueError(f"shift={shift} works along the last axis of targets, which must not be the split axis: "
                     f"targets need a batch axis before it, got shape {jnp.shape(targets)}")
  parts = math.prod(mesh.shape[a] for a in axes)
  for name, x in (("e", e), ("targets", targets), ("weights", weights)):
    if x is not None and jnp.shape(x)[0] % parts:
      raise ValueError(f"{name}'s leading axis ({jnp.shape(x)[0]}) is not divisible by the {parts} devices of "
                       f"batch_axes {axes}")
