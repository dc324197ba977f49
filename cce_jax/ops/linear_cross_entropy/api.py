"""Public entry points: `linear_cross_entropy` and `token_logprobs` (their signatures and documentation; the
checks and the backends' dispatch are `dispatch`'s)."""

from __future__ import annotations

from typing import Literal

from cce_jax.ops.linear_cross_entropy import dispatch
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig
from cce_jax.typing import Array, Float, Int


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
    filter_eps: float | Literal["auto"] | None = None,
    exact: bool = False,
    implementation: str | None = "auto",
    config: XlaChunkedConfig | PallasGpuConfig | PallasTpuConfig | None = None,
    interpret: bool = False,
):
  """Cross-entropy of softmax(e @ c.T + bias) against integer targets, without materialising the logits.

  The logits `z = e @ c.T (+ bias)`, optionally softcapped to `softcap * tanh(z / softcap)`, exist only one
  [block_n, block_v] tile at a time; the forward keeps the fp32 log-sum-exp per token for the backward, which
  recomputes the tiles (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"). On Hopper
  GPUs a reduced loss with `filter_eps=None` instead forms its gradient in the forward pass from one chunk of
  tokens at a time (a bf16 [chunk, V] workspace, 2 GiB by default, and an fp32 [V, D] sum; three GEMMs instead of
  four: `PallasGpuConfig.forward_gradient`).

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
    reduction: "mean": sum(w·loss) / sum(w) over the scored (non-ignored) tokens, w = 1 without weights; where
      that sum of weights is 0 (no scored token, or weights that cancel) it divides by 1 instead, so a mean over
      no scored token is 0. "sum": sum(w·loss). "none": the per-token w·loss of shape [*B], 0 at ignored
      positions.
    shift: k >= 0; train position i on target i + k along the last leading axis.
    label_smoothing: α in [0, 1).
    weights: optional [*B] real per-position weights (aligned with the output positions, i.e. with e). Each
      multiplies its token's loss, and so its gradient. Negative weights are allowed and flip the sign of that
      token's term (e.g. advantage-weighted log-likelihood); "mean"'s sum of weights may then be negative or 0
      (see reduction), and "sum" with a normaliser of one's own is usually what is meant. Their values are not
      checked: under jit they are not known.
    z_loss: coefficient >= 0 of the auxiliary z-loss z_loss·lse² (PaLM), added per non-ignored token.
    return_lse: also return the per-token LSE [*B] (fp32, differentiable; computed at every position).
    filter_eps: gradient filtering, opt-in: a tile whose |softmax - onehot| is below this everywhere skips its
      gradient GEMMs (the backend's tile; where pallas_gpu's filter would keep most tiles it computes them all,
      the full gradient). "auto": 2^-12 for 16-bit inputs without label smoothing, else off. None (the
      default): the full gradient. Filtering pays on peaked softmaxes only; on a trained LM's broad softmax it
      is slower than the full gradient on Hopper and trains to a worse loss (docs/filtering.md).
    exact: HIGHEST matmul precision, no gradient filtering, bitwise deterministic run to run.
    implementation: "auto" (best available: "pallas_gpu" on NVIDIA GPUs, "pallas_tpu" on TPUs, else
      "xla_chunked"), "pallas_gpu" (Triton kernels), "xla_chunked" (blockwise XLA, any platform), "xla_fused"
      (XLA over row blocks of logits with the gradient formed in the forward pass: three GEMMs instead of four, an
      fp32 [V, D] accumulator, no filtering; reduction "mean"/"sum" only, no return_lse), "reference"
      (materialised logits, for tests), "pallas_tpu" (Mosaic TPU kernels: every option, per-tile filtering in the
      backward; not yet measured on a TPU).
    config: tile sizes: an `XlaChunkedConfig` for "xla_chunked" and "xla_fused" (rows per block: block_n), a
      `PallasGpuConfig` for "pallas_gpu", a `PallasTpuConfig` for "pallas_tpu" (default: the config class's
      `for_shape`).
    interpret: run Pallas kernels in the interpreter (CPU testing of the Pallas implementations; "pallas_tpu" runs
      in the TPU interpreter).

  Returns:
    The loss (fp32 scalar, or [*B] for reduction="none"), and the LSE [*B] when `return_lse`.
  """
  return dispatch.cross_entropy(
      e, c, targets, bias=bias, ignore_index=ignore_index, softcap=softcap, reduction=reduction, shift=shift,
      label_smoothing=label_smoothing, weights=weights, z_loss=z_loss, return_lse=return_lse, filter_eps=filter_eps,
      exact=exact, implementation=implementation, config=config, interpret=interpret, vocab_split=None)


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
    config: XlaChunkedConfig | PallasGpuConfig | PallasTpuConfig | None = None,
    interpret: bool = False,
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
    implementation, config, interpret: as in `linear_cross_entropy`.

  Returns:
    logprobs [*B] fp32, and entropy [*B] fp32 when `return_entropy`.
  """
  return dispatch.logprobs(
      e, c, targets, bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index, shift=shift,
      return_entropy=return_entropy, exact=exact, implementation=implementation, config=config, interpret=interpret,
      vocab_split=None)
