"""The fused TPU backward (`tpu_fused_backward`, `PallasTpuConfig.backward="fused"`) in the TPU interpreter on CPU.

The base suite of test_pallas_tpu.py runs the default (fused) backward; here: every option at once at odd
shapes against the reference and against the split backward, on one TensorCore and on the two of a megacore
chip (a vocabulary-block count that does not split evenly, so the last core has a spare program), the per-tile
filter of both backwards against NumPy, the roofline's choice, and the base suite through the split backward
(CCE_JAX_SLOW_TESTS=1; by default the split is checked here against the reference and the fused backward).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import cce_jax
from cce_jax.ops.linear_cross_entropy import tpu_roofline
from cce_jax.ops.linear_cross_entropy import tpu_tiles
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig
from tests.ops.linear_cross_entropy import helpers
from tests.ops.linear_cross_entropy import test_pallas_tpu

pytestmark = pytest.mark.skipif(not hasattr(pltpu, "InterpretParams"),
                                reason="needs jax.experimental.pallas.tpu.InterpretParams (the TPU interpreter)")

SMALL = PallasTpuConfig(block_n=8, block_v=128, block_d=128, grad_block_n=8, grad_block_v=128, grad_block_d=128)


class TestPallasTpuSplitInterpret(test_pallas_tpu.TestPallasTpuInterpret):
  """The base suite through the split backward (every case with CCE_JAX_SLOW_TESTS=1 only)."""

  extra = {"config": dataclasses.replace(test_pallas_tpu.SUITE_CONFIG, backward="split"), "interpret": True}

  @pytest.fixture(autouse=True)
  def _default_cases(self):
    if not os.environ.get("CCE_JAX_SLOW_TESTS"):
      pytest.skip("slow in the TPU interpreter; CCE_JAX_SLOW_TESTS=1 runs it")


def _loss_and_grads(impl, e, c, bias, targets, weights, **kw):
  def f(e, c, bias):
    loss, lse = cce_jax.linear_cross_entropy(e, c, targets, bias=bias, weights=weights, implementation=impl,
                                             reduction="none", return_lse=True, **kw)
    r = jax.random.uniform(jax.random.key(2), loss.shape, minval=0.5, maxval=1.5)
    return jnp.sum(loss * r) + jnp.sum(lse * r[..., ::-1]), (loss, lse)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(e, c, bias)


# One core (v5e) is also the default suite's (test_pallas_tpu.py); here with CCE_JAX_SLOW_TESTS=1 only.
@pytest.mark.parametrize("generation", [
    pytest.param("v5e", marks=pytest.mark.skipif(not os.environ.get("CCE_JAX_SLOW_TESTS"), reason="slow")), "v5p"])
def test_fused_matches_reference_and_split_with_every_option(generation):
  """Odd N (3 x 13), D (200: a 128 block and a tail) and V (530: five vocabulary blocks, so v5p's two cores
  take three and two, the second with a spare program), with bias, softcap, label smoothing, z-loss, weights,
  ignored targets and shift: losses, LSE and the gradients of e, c and bias against the reference, and the
  gradients against the split backward's."""
  n_shape, d, v = (3, 13), 200, 530
  e, c, targets, bias = helpers.make_inputs(d + v, n_shape, d, v, bias=True, ignore_frac=0.2)
  weights = jax.random.uniform(jax.random.key(5), n_shape, minval=0.0, maxval=2.0)
  kw = dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-2, shift=1)
  fused = dataclasses.replace(SMALL, generation=generation)
  (_, (loss, lse)), grads = _loss_and_grads("pallas_tpu", e, c, bias, targets, weights, config=fused,
                                            interpret=True, **kw)
  (_, (ref_loss, ref_lse)), ref_grads = _loss_and_grads("reference", e, c, bias, targets, weights, **kw)
  assert helpers.rel_err(loss, ref_loss) <= helpers.F32_RTOL
  assert helpers.rel_err(lse, ref_lse) <= helpers.F32_RTOL
  for g, r in zip(grads, ref_grads):
    assert bool(jnp.all(jnp.isfinite(g)))
    assert helpers.rel_err(g, r) <= helpers.F32_RTOL
  split = dataclasses.replace(fused, backward="split")
  _, split_grads = _loss_and_grads("pallas_tpu", e, c, bias, targets, weights, config=split, interpret=True, **kw)
  for g, s in zip(grads, split_grads):
    assert helpers.rel_err(g, s) <= 1e-6  # the same tiles, summed in the same order but for the cores' partials


@pytest.mark.parametrize("backward,generation", [("fused", "v5p"), ("split", "v5e")])
def test_filter_drops_the_same_tiles_in_both_backwards(backward, generation):
  """With filter_eps both backwards drop exactly the [grad_block_n, grad_block_v] tiles whose |dS| is below it
  everywhere (float64 NumPy on peaked inputs, odd N and V), and the fused one drops them from dE, dC and the bias
  gradient alike."""
  n, d, v, bn, bv = 21, 32, 1200, 8, 128
  e, c, targets, _ = helpers.make_inputs(41, (n,), d, v, regime="peaked")
  e = e + 6.0 * c[targets]
  bias = jnp.zeros((v,), jnp.float32)
  cfg = dataclasses.replace(SMALL, backward=backward, generation=generation)
  eps = 1e-3
  grad = jax.jit(jax.grad(lambda e, c, b: cce_jax.linear_cross_entropy(
      e, c, targets, bias=b, reduction="sum", filter_eps=eps, implementation="pallas_tpu", config=cfg,
      interpret=True), argnums=(0, 1, 2)))
  de, dc, db = grad(e, c, bias)
  e64, c64 = np.asarray(e, np.float64), np.asarray(c, np.float64)
  z = e64 @ c64.T
  p = np.exp(z - z.max(1, keepdims=True))
  ds = p / p.sum(1, keepdims=True) - np.eye(v)[np.asarray(targets)]
  pad = np.zeros((-(-n // bn) * bn, -(-v // bv) * bv))
  pad[:n, :v] = np.abs(ds)
  tile_max = pad.reshape(pad.shape[0] // bn, bn, pad.shape[1] // bv, bv).max(axis=(1, 3))
  keep = np.repeat(np.repeat(tile_max >= eps, bn, 0), bv, 1)[:n, :v]
  assert 0.2 < keep.mean() < 0.8
  kept = np.where(keep, ds, 0.0)
  assert helpers.rel_err(de, kept @ c64) < 1e-4 and helpers.rel_err(dc, kept.T @ e64) < 1e-4
  assert helpers.rel_err(db, kept.sum(0)) < 1e-4
  assert helpers.rel_err(kept @ c64, ds @ c64) > 1e-3  # the filter changed the gradient


def test_roofline_prefers_the_fused_backward_at_the_benchmark_shapes():
  """At the benchmark shapes (bf16) on every generation the roofline expects the fused backward (with its tiles)
  no slower than the split one (with its), so `for_shape` picks it; its tiles fit the VMEM budget."""
  for n, d, v in ((8192, 2304, 256000), (8192, 4096, 128256), (16384, 1024, 151936)):
    for generation in ("v4", "v5e", "v5p", "v6e"):
      best = PallasTpuConfig.for_shape(n, v, d, itemsize=2, generation=generation)
      split = PallasTpuConfig.for_shape(n, v, d, itemsize=2, generation=generation, backward="split")
      assert best.backward == "fused", (n, d, v, generation)
      best.check_vmem(n, v, d, 2)
      fused_s = tpu_roofline.loss_and_gradient_s(best, n, v, d)
      assert fused_s <= tpu_roofline.loss_and_gradient_s(split, n, v, d)
      assert fused_s >= tpu_roofline.three_gemm_floor(generation, n, v, d) * 4 / 3 * 0.999  # four GEMMs at least
  assert set(tpu_roofline.expected(best, 64, 256, 128)) == {"forward", "bwd"}
  assert set(tpu_roofline.expected(split, 64, 256, 128)) == {"forward", "de", "dc"}


def test_fused_config_checks():
  with pytest.raises(ValueError, match=r"^PallasTpuConfig.backward must be 'fused' or 'split', got 'both'$"):
    PallasTpuConfig(backward="both")
  # The split backward's kernels hold the larger of the two row blocks, the fused one only dC's.
  cfg = PallasTpuConfig(block_n=128, block_v=128, grad_block_n=1024, grad_block_v=128, grad_block_d=128,
                        generation="v4")
  dataclasses.replace(cfg, backward="fused").check_vmem(8192, 256000, 4096, 2)
  with pytest.raises(ValueError, match=r"^PallasTpuConfig: the split backward tiles need .* v4's 12 MiB budget"):
    dataclasses.replace(cfg, backward="split").check_vmem(8192, 256000, 4096, 2)


def test_two_cores_race_free_in_the_interpreter(monkeypatch):
  """The fused backward's grid on a two-core chip (v5p), run by the interpreter on two simulated cores with its
  "parallel" dimension split between them and race detection on: no two cores touch the same dE or dC memory
  (each has its own dE partial and its own vocabulary blocks), and the gradients match the reference."""
  known = {f.name for f in dataclasses.fields(pltpu.InterpretParams)}
  cores = next((name for name in ("num_cores_or_threads", "num_cores_per_device") if name in known), None)
  if cores is None or "detect_races" not in known:
    pytest.skip("this jax's TPU interpreter simulates one core or detects no races")
  params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan",
                                 **{cores: 2})
  monkeypatch.setattr(tpu_tiles, "interpret_params", lambda interpret: params if interpret else False)
  monkeypatch.setattr(tpu_tiles, "compiler_params", lambda semantics, limit, interpret: pltpu.CompilerParams(
      dimension_semantics=semantics, vmem_limit_bytes=limit))
  n, d, v = 20, 136, 530  # five vocabulary blocks: three on the first core, two and a spare program on the second
  e, c, targets, bias = helpers.make_inputs(7, (n,), d, v, bias=True)
  cfg = dataclasses.replace(SMALL, generation="v5p")
  loss = lambda impl, **kw: lambda e, c, b: cce_jax.linear_cross_entropy(e, c, targets, bias=b, softcap=5.0,
                                                                         implementation=impl, **kw)
  grads = jax.jit(jax.grad(loss("pallas_tpu", config=cfg, interpret=True), argnums=(0, 1, 2)))(e, c, bias)
  want = jax.grad(loss("reference"), argnums=(0, 1, 2))(e, c, bias)
  for g, r in zip(grads, want):
    assert helpers.rel_err(g, r) <= helpers.F32_RTOL
