"""The "pallas_tpu" backend: Pallas kernels for TPUs (Mosaic TPU), the per-token statistics and their backward.

Same contract as `xla_chunked.logit_stats` (the math: `base`): one custom_vjp whose outputs are the per-token LSE,
target logit, logit sum and softmax-mean logit, from which `stats_losses` forms every loss of
`linear_cross_entropy` and `token_logprobs` (bias, softcap, temperature, label smoothing, z-loss, return_lse,
and, in `dispatch`, ignore_index, shift, weights and the reductions), so every option runs through the kernels.

Forward: `tpu_forward` (grid over token, vocabulary and hidden-size blocks; an fp32 VMEM logit tile and an online
log-sum-exp). Backward (`PallasTpuConfig.backward`): "fused", the default, `tpu_fused_backward` (one kernel
recomputing each logit tile once for both gradients, dC's fp32 row block in VMEM, dE's fp32 tiles
read-modify-written in HBM; four N·V·D GEMMs with the forward's), or "split", `tpu_backward` (two kernels
recomputing the logit tiles, fp32 dE and dC row blocks in VMEM; five GEMMs); the default follows the roofline
(`tpu_roofline`). Gradient filtering is per [grad_block_n, grad_block_v] tile in either backward: a tile below
`filter_eps` skips its gradient GEMMs but not its logits, so on a TPU it saves at most two thirds of the fused
backward's work; whether more pays (the GPU's keep masks, vocabulary sorting) is to be measured on a TPU. Exact
mode: HIGHEST matmul precision, no filtering; the kernels are deterministic in every mode.

Not yet measured on a TPU: the kernels are checked in the TPU interpreter on CPU and lowered to Mosaic by
`jax.export` for the TPU platform (the tests), with block sizes from the roofline (`tpu_config`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import stats_losses
from cce_jax.ops.linear_cross_entropy import tpu_backward
from cce_jax.ops.linear_cross_entropy import tpu_forward
from cce_jax.ops.linear_cross_entropy import tpu_fused_backward
from cce_jax.ops.linear_cross_entropy import tpu_tiles
from cce_jax.ops.linear_cross_entropy.base import LogitStats
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig


@dataclasses.dataclass(frozen=True)
class Spec:
  """Hashable (it keys the custom_vjp): the math options, the tiles, the TPU interpreter (CPU tests)."""

  stats: base.StatsSpec
  config: PallasTpuConfig
  interpret: bool


def cross_entropy_per_token(e_NxD, c_VxD, bias_V, targets_N, valid_N, *, softcap, label_smoothing, z_loss,
                            filter_eps, exact, config, interpret=False, combine=None, vocab_size=None):
  """Per-token loss [N] (0 where not valid_N) and LSE [N], fp32, by the Mosaic TPU kernels. combine: applied to
  the statistics before the loss (a vocabulary split's merge), with the split's `vocab_size`."""
  stats_spec = base.StatsSpec(softcap=softcap, inv_temperature=1.0, with_sum=bool(label_smoothing),
                              with_mean=False, exact=exact, filter_eps=None if exact else filter_eps)
  stats = logit_stats(Spec(stats_spec, config, interpret), e_NxD, c_VxD, bias_V, targets_N)
  stats = stats if combine is None else combine(stats)
  return stats_losses.cross_entropy(stats, valid_N, vocab_size=vocab_size or c_VxD.shape[0],
                                    label_smoothing=label_smoothing, z_loss=z_loss)


def logprobs_per_token(e_NxD, c_VxD, bias_V, targets_N, *, softcap, temperature, exact, config, interpret=False,
                       combine=None):
  """log p(target) [N] and entropy [N] of softmax(logits / temperature), fp32, by the Mosaic TPU kernels."""
  stats_spec = base.StatsSpec(softcap=softcap, inv_temperature=1.0 / temperature, with_sum=False, with_mean=True,
                              exact=exact, filter_eps=None)
  stats = logit_stats(Spec(stats_spec, config, interpret), e_NxD, c_VxD, bias_V, targets_N)
  return stats_losses.logprobs(stats if combine is None else combine(stats))


def logit_stats(spec: Spec, e_NxD, c_VxD, bias_V, targets_N) -> LogitStats:
  """`base.LogitStats` of [N] arrays (fp32; f64 for f64 inputs in the interpreter), differentiable in e, c and
  bias. The kernels run the blocks of `PallasTpuConfig.tiles` for these shapes."""
  tpu_tiles.check_dtypes(e_NxD, c_VxD, bias_V, interpret=spec.interpret)
  itemsize = max(e_NxD.dtype.itemsize, c_VxD.dtype.itemsize)
  if not spec.interpret:
    spec.config.check_vmem(e_NxD.shape[0], c_VxD.shape[0], e_NxD.shape[1], itemsize)
  return LogitStats(*_stats(spec, e_NxD, c_VxD, bias_V, targets_N))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(spec, e_NxD, c_VxD, bias_V, targets_N):
  return _stats_fwd(spec, e_NxD, c_VxD, bias_V, targets_N)[0]


def _stats_fwd(spec, e_NxD, c_VxD, bias_V, targets_N):
  lse, target, total, mean = tpu_forward.logit_stats(spec.stats, spec.config, e_NxD, c_VxD, bias_V, targets_N,
                                                     interpret=spec.interpret)
  return (lse, target, total, mean), (e_NxD, c_VxD, bias_V, targets_N, lse, mean)


def _stats_bwd(spec, residuals, cotangents):
  backward = tpu_fused_backward if spec.config.backward == "fused" else tpu_backward
  return backward.gradients(spec.stats, spec.config, residuals, cotangents, interpret=spec.interpret)


_stats.defvjp(_stats_fwd, _stats_bwd)
