"""GPTQ's layer Hessian `H = 2 XᵀX / n` as a running mean over calibration batches, kept on the device.

    state = quant.hessian_init(k)                    # k = the layer's input features
    for x in batches:                                # x: [..., k] inputs of the layer (any float dtype)
      state = quant.hessian_update(state, x)         # jit-able; fp32 accumulation
    w_q = quant.gptq(w, state.hessian, "int4", group_size=128)

After batches with n₁, n₂, … tokens, `hessian` is `2 Σ xxᵀ / (n₁ + n₂ + …)` (the IST-DASLab update: the old mean
reweighted by n/(n+m), plus the new batch's sum scaled by 2/(n+m)), so memory is one [k, k] fp32 matrix however
much calibration text flows through. `mask` (shape x.shape[:-1], 1 = real token) leaves out padding tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class HessianState(NamedTuple):
  """`hessian`: [k, k] float32, `2 XᵀX / count` over the tokens seen; `count`: float32 scalar, tokens seen."""
  hessian: jax.Array
  count: jax.Array


def hessian_init(k: int) -> HessianState:
  """An empty accumulator for a layer with `k` input features: zeros [k, k] float32, count 0."""
  return HessianState(jnp.zeros((k, k), jnp.float32), jnp.zeros((), jnp.float32))


@jax.jit
def hessian_update(state: HessianState, x, mask=None) -> HessianState:
  """The running mean after one batch `x` [..., k] (flattened over the leading axes; fp32 accumulation)."""
  k = state.hessian.shape[0]
  if x.shape[-1] != k:
    raise ValueError(f"hessian_update: x has {x.shape[-1]} features on its last axis, the accumulator has {k}")
  x_nk = x.reshape(-1, k).astype(jnp.float32)
  if mask is None:
    m = jnp.float32(x_nk.shape[0])
  else:
    keep = mask.reshape(-1).astype(jnp.float32)
    x_nk = x_nk * keep[:, None]
    m = jnp.sum(keep)
  total = state.count + m
  old = jnp.where(total > 0, state.count / jnp.maximum(total, 1.0), 0.0)
  new = jnp.where(total > 0, 2.0 / jnp.maximum(total, 1.0), 0.0)
  xtx = jnp.einsum("nk,nl->kl", x_nk, x_nk, precision=jax.lax.Precision.HIGHEST)
  return HessianState(state.hessian * old + new * xtx, total)
