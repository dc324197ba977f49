"""The methods the loss benchmark compares (by name) and how it measures them: median device time and relative
L2 error against the fp32 reference (the "Protocol" section of BENCHMARKS.md)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cce_jax.ops.linear_cross_entropy.api import linear_cross_entropy
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig
from cce_jax.ops.linear_cross_entropy.timing import median_ms as median_ms


def naive_loss(e, c, targets, softcap):
  """Materialised logits in the input dtype, then a fp32 log-softmax: what one writes by hand."""
  logits_NxV = (e @ c.T).astype(jnp.float32)
  if softcap is not None:
    logits_NxV = softcap * jnp.tanh(logits_NxV / softcap)
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  return jnp.mean(lse_N - jnp.take_along_axis(logits_NxV, targets[:, None], axis=-1)[:, 0])


# The default config with one change (and the op's keyword arguments): "lowmem" the filtered backward in ~10-13 MiB
# of temporaries (low_memory), "sparse" always through the tile-skipping kernels (no dense fallback), "sorted" with
# the vocabulary sorted by mean logit first, "triton" with the Triton forward where Mosaic GPU's would run,
# "full_recompute" filter_eps=None through the four-GEMM recomputing backward.
_CONFIG_VARIANTS = {
    "pallas_gpu_lowmem": (dict(low_memory=True), dict(filter_eps="auto")),
    "pallas_gpu_sparse": (dict(dense_backward_above=1.0), dict(filter_eps="auto")),
    "pallas_gpu_sorted": (dict(sort_vocabulary=True), dict(filter_eps="auto")),
    "pallas_gpu_triton": (dict(forward_kernel="triton"), dict(filter_eps="auto")),
    "pallas_gpu_full_recompute": (dict(forward_gradient="off"), dict(filter_eps=None)),
}


def loss_fn(method, softcap):
  """The mean loss (e [N, D], c [V, D], targets [N]) -> fp32 scalar of the method named `method`."""
  if method == "naive":
    return lambda e, c, t: naive_loss(e, c, t, softcap)
  if method in _CONFIG_VARIANTS:
    overrides, kw = _CONFIG_VARIANTS[method]

    def variant(e, c, t):
      cfg = PallasGpuConfig.for_shape(e.shape[0], c.shape[0], c.shape[1], softcap=softcap,
                                      filtered=kw["filter_eps"] is not None)
      cfg = dataclasses.replace(cfg, **overrides)
      return linear_cross_entropy(e, c, t, softcap=softcap, implementation="pallas_gpu", config=cfg, **kw)
    return variant
  if method == "pallas_tpu_split":  # the two-kernel backward (the roofline's default is the fused one)
    def split(e, c, t):
      cfg = PallasTpuConfig.for_shape(e.shape[0], c.shape[0], c.shape[1], itemsize=e.dtype.itemsize,
                                      backward="split")
      return linear_cross_entropy(e, c, t, softcap=softcap, implementation="pallas_tpu", config=cfg)
    return split
  kw = {"reference": dict(implementation="reference"), "xla_chunked": dict(implementation="xla_chunked"),
        "xla_fused": dict(implementation="xla_fused"), "xla_fused_exact": dict(implementation="xla_fused", exact=True),
        "pallas_gpu": dict(implementation="pallas_gpu", filter_eps="auto"),
        "pallas_gpu_full": dict(implementation="pallas_gpu", filter_eps=None),
        "pallas_gpu_exact": dict(implementation="pallas_gpu", exact=True),
        "pallas_tpu": dict(implementation="pallas_tpu"),
        "pallas_tpu_filtered": dict(implementation="pallas_tpu", filter_eps="auto")}[method]
  return lambda e, c, t: linear_cross_entropy(e, c, t, softcap=softcap, **kw)


def rel_err(x, ref):
  """||x - ref|| / ||ref|| in fp32."""
  x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))
