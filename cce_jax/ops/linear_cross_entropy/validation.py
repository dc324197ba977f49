"""Argument checks for the public ops: clear errors before anything is traced or run."""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig

IMPLEMENTATIONS = ("auto", "pallas_gpu", "pallas_tpu", "xla_chunked", "xla_fused", "reference")
REDUCTIONS = ("mean", "sum", "none")
# finfo(bf16).eps / 32: below this, a softmax entry of a 16-bit model cannot move its gradient (CCE §4.3).
DEFAULT_FILTER_EPS = 2.0 ** -12


def static_number(name, value, *, low=None, low_inclusive=True, high=None, high_inclusive=False,
                  allow_none=False, integer=False):
  """A Python (or NumPy) scalar within bounds; traced values are refused (these options are static)."""
  if value is None and allow_none:
    return None
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    what = "an int" if integer else "a Python float"
    raise TypeError(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}")
  value = int(value) if integer else float(value)
  if not np.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}")
  if low is not None and (value < low or (value == low and not low_inclusive)):
    raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
  if high is not None and (value > high or (value == high and not high_inclusive)):
    raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value}")
  return value


def check_arrays(e, c, targets, bias=None, weights=None):
  """Ranks, shapes and dtypes of the array arguments; returns them as jnp arrays."""
  e, c, targets = jnp.asarray(e), jnp.asarray(c), jnp.asarray(targets)
  if not jnp.issubdtype(e.dtype, jnp.floating):
    raise TypeError(f"e must be a floating-point array, got dtype {e.dtype}")
  if not jnp.issubdtype(c.dtype, jnp.floating):
    raise TypeError(f"c must be a floating-point array, got dtype {c.dtype}")
  if targets.dtype == jnp.bool_ or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f"targets must be an integer array, got dtype {targets.dtype}")
  if e.ndim < 1:
    raise ValueError("e must have shape [..., D], got a scalar")
  if c.ndim != 2:
    raise ValueError(f"c must have shape [V, D], got shape {c.shape}")
  if c.shape[1] != e.shape[-1]:
    raise ValueError(f"e and c must share the hidden size D: e.shape={e.shape}, c.shape={c.shape}")
  if c.shape[0] < 1:
    raise ValueError(f"c must have at least one row (V >= 1), got shape {c.shape}")
  if targets.shape != e.shape[:-1]:
    raise ValueError(
        f"targets.shape must equal e.shape[:-1]: e.shape={e.shape}, targets.shape={targets.shape}")
  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"bias must be a floating-point array, got dtype {bias.dtype}")
    if bias.shape != (c.shape[0],):
      raise ValueError(f"bias must have shape [V] = ({c.shape[0]},), got {bias.shape}")
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.dtype == jnp.bool_ or not jnp.issubdtype(weights.dtype, jnp.number):
      raise TypeError(f"weights must be a real array, got dtype {weights.dtype}")
    if jnp.issubdtype(weights.dtype, jnp.complexfloating):
      raise TypeError(f"weights must be a real array, got dtype {weights.dtype}")
    if weights.shape != targets.shape:
      raise ValueError(
          f"weights.shape must equal targets.shape: weights.shape={weights.shape}, "
          f"targets.shape={targets.shape}")
  return e, c, targets, bias, weights


def resolve_implementation(implementation, interpret, config, *, platform):
  """The backend name that runs, after checking the switch and its companions.

  "auto" picks "pallas_gpu" on NVIDIA GPUs and when `interpret=True`, "pallas_tpu" on TPUs, else "xla_chunked".
  """
  if implementation is None:
    implementation = "auto"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if not isinstance(interpret, bool):
    raise TypeError(f"interpret must be a bool, got {interpret!r}")
  if implementation == "auto":
    chosen = "pallas_gpu" if interpret or platform == "gpu" else "pallas_tpu" if platform == "tpu" else "xla_chunked"
  else:
    chosen = implementation
  if interpret and chosen not in ("pallas_gpu", "pallas_tpu"):
    raise ValueError(f"interpret=True applies to Pallas implementations only, not {implementation!r}")
  if chosen == "pallas_gpu" and not interpret and platform != "gpu":
    raise ValueError(
        f"implementation='pallas_gpu' needs an NVIDIA GPU (the default backend is {platform!r}); pass "
        "interpret=True to run the kernels in the Pallas interpreter")
  if chosen == "pallas_tpu" and not interpret and platform != "tpu":
    raise ValueError(
        f"implementation='pallas_tpu' needs a TPU (the default backend is {platform!r}); pass interpret=True to "
        "run the kernels in the TPU interpreter")
  if config is not None:
    wanted = {"xla_chunked": XlaChunkedConfig, "xla_fused": XlaChunkedConfig, "pallas_gpu": PallasGpuConfig,
              "pallas_tpu": PallasTpuConfig}.get(chosen)
    if wanted is None or not isinstance(config, wanted):
      raise TypeError(
          f"config must be {wanted.__name__ if wanted else 'None'} for implementation {chosen!r}, got "
          f"{type(config).__name__}")
  return chosen


def resolve_filter_eps(filter_eps, *, exact, label_smoothing, compute_dtype):
  """The gradient-filter threshold to use, or None for no filtering."""
  if exact:
    if filter_eps not in ("auto", None):
      raise ValueError(f"exact=True computes every gradient tile; it cannot take filter_eps={filter_eps!r}")
    return None
  if filter_eps is None:
    return None
  if isinstance(filter_eps, str):
    if filter_eps != "auto":
      raise ValueError(f"filter_eps must be 'auto', a float >= 0 or None, got {filter_eps!r}")
    low_precision = jnp.finfo(compute_dtype).bits <= 16
    return DEFAULT_FILTER_EPS if low_precision and not label_smoothing else None
  eps = static_number("filter_eps", filter_eps, low=0.0)
  if label_smoothing:
    raise NotImplementedError(
        "filter_eps with label_smoothing > 0: the smoothing term reaches every vocabulary entry, so no tile"
        " can be skipped; pass filter_eps=None or 'auto'")
  return eps
