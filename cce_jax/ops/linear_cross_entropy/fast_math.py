"""exp and tanh for the per-element work of the Pallas-Triton kernels, built on the GPU's ex2 and rcp units.

jnp.exp and jnp.tanh lower to libdevice's accurate `expf` / `tanhf` (range reduction, branches): in the
epilogue of every [block_n, block_v] logit tile they cost a sizeable fraction of the tile's GEMM time. Here

  exp(x)  = 2^(x·log2 e)                          (ex2.approx.ftz.f32: relative error ~2^-22)
  tanh(x) = 1 - 2 / (1 + 2^(2x·log2 e))           (ex2 + rcp.approx.ftz.f32: absolute error ~1e-7)

The absolute tanh error is what matters for a softcap (softcap · error ≈ 3e-6 at softcap 30); exp(x) of x below
about -87 flushes to 0, where the softmax term is below fp32's resolution anyway. Both saturate correctly
(tanh(±inf) = ±1) and propagate NaN. `Math(interpret=True)` uses the same formulas on jnp.exp2 and a plain
reciprocal (the interpreter cannot run PTX), so CPU tests exercise the formulas.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

_LOG2E = 1.4426950408889634


def _ptx_unary(instruction, x):
  return plgpu.elementwise_inline_asm(
      f"{instruction} $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]


@dataclasses.dataclass(frozen=True)
class Math:
  """exp / tanh for kernels; fp32 only on the fast path (other dtypes use jnp's)."""

  interpret: bool = False
  fast: bool = True

  def _exp2(self, x):
    return jnp.exp2(x) if self.interpret else _ptx_unary("ex2.approx.ftz.f32", x)

  def _rcp(self, x):
    return 1.0 / x if self.interpret else _ptx_unary("rcp.approx.ftz.f32", x)

  def _use_fast(self, x):
    return self.fast and x.dtype == jnp.float32

  def exp(self, x):
    if not self._use_fast(x):
      return jnp.exp(x)
    return self._exp2(x * _LOG2E)

  def tanh(self, x):
    if not self._use_fast(x):
      return jnp.tanh(x)
    return 1.0 - 2.0 * self._rcp(1.0 + self._exp2(x * (2.0 * _LOG2E)))
