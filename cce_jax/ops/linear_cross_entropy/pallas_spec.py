"""The "pallas_gpu" backend's static spec (the math options, the tile config, the interpreter flag) and what it
selects: the tile-skipping backward, and where the Mosaic GPU kernels run."""

from __future__ import annotations

import dataclasses

import jax

from cce_jax.ops.linear_cross_entropy import base
from cce_jax.ops.linear_cross_entropy import mosaic_pipeline
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig


@dataclasses.dataclass(frozen=True)
class Spec:
  """Hashable (it keys the custom_vjp): `stats` the math options, `config` the tiles and kernels, `interpret` the
  Pallas interpreter (CPU tests)."""

  stats: base.StatsSpec
  config: PallasGpuConfig
  interpret: bool


def make(softcap, inv_temperature, with_sum, with_mean, config, exact, filter_eps, interpret) -> Spec:
  stats = base.StatsSpec(softcap=softcap, inv_temperature=inv_temperature, with_sum=with_sum,
                         with_mean=with_mean, exact=exact, filter_eps=filter_eps)
  return Spec(stats=stats, config=config, interpret=interpret)


def tile_skipping(spec: Spec) -> bool:
  """Whether the backward may run the tile-skipping kernels (and so the forward writes per-row tile maxima)."""
  return (spec.stats.filter_eps is not None and not spec.stats.exact
          and spec.config.dense_backward_above > 0.0)


def backward_spec(spec: Spec) -> Spec:
  """The spec whose block_n is the tile-skipping backward's token tile (`PallasGpuConfig.grad_block_n`)."""
  return dataclasses.replace(spec, config=dataclasses.replace(spec.config, block_n=spec.config.grad_block_n))


def use_mosaic(spec: Spec, field: str, fallback: str, reason: str | None) -> bool:
  """Whether a Mosaic GPU kernel runs, for config.<field> in ("auto", "mosaic", fallback) and the reason it
  cannot run these inputs (None if it can): "auto" on Hopper GPUs when it can; "mosaic" always, else an error."""
  kind = getattr(spec.config, field)
  if kind == fallback:
    return False
  if reason is None and not spec.interpret and not mosaic_pipeline.is_hopper():
    reason = f"needs a Hopper (sm_90) GPU, got {jax.devices()[0].device_kind}"
  if kind == "auto":
    return reason is None and not spec.interpret
  if reason is not None:
    raise ValueError(f"PallasGpuConfig({field}='mosaic'): the Mosaic GPU kernel {reason}; {field}='auto' falls "
                     f"back to the {fallback} kernel")
  return True
