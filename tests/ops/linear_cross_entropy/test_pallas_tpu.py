"""The op's test base on the Mosaic TPU kernels of "pallas_tpu", in the TPU interpreter on CPU.

The interpreter (`pltpu.InterpretParams`: races not checked, out-of-bounds reads raise) pads every edge block
with NaN, so a block read past N, V or D that reached a result would show as NaN here; the suite's tiles leave
partial edge blocks at most test shapes. Beside the base: edge blocks in every dimension against the reference,
the per-tile filter against NumPy, vmap, the vocabulary split over two devices, the config's checks, the choice
of "auto", and the kernels lowered to Mosaic for the TPU platform (`jax.export`), which checks that Pallas's
Mosaic lowering accepts their shapes and operations without a TPU.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import cce_jax
from cce_jax.ops.linear_cross_entropy import tpu_config
from cce_jax.ops.linear_cross_entropy import tpu_tiles
from cce_jax.ops.linear_cross_entropy import validation
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig
from tests.ops.linear_cross_entropy import helpers
from tests.ops.linear_cross_entropy.test_base import LinearCrossEntropyTestBase

pytestmark = pytest.mark.skipif(not hasattr(pltpu, "InterpretParams"),
                                reason="needs jax.experimental.pallas.tpu.InterpretParams (the TPU interpreter)")

# block_v 384 leaves a partial last vocabulary block at every V of the base; D > 128 gets hidden-size blocks.
SUITE_CONFIG = PallasTpuConfig(block_n=32, block_v=384, block_d=128, grad_block_n=24, grad_block_v=256,
                               grad_block_d=128)


# The base's cases that run by default: one of each kind (every option at once with each reduction, f64 finite
# differences, NaN inputs, 16-bit inputs, jit/vmap/remat, token_logprobs; odd shapes and the filter: below).
# Each compiles three interpreted kernels (5-15 s of one CPU core); CCE_JAX_SLOW_TESTS=1 runs all 54.
DEFAULT_CASES = frozenset({
    "test_options_f32[all]", "test_options_f32[all_mean]", "test_check_grads_f64", "test_nan_and_inf_propagate[inf-c]",
    "test_low_precision_no_worse_than_naive[softcap_bias-options1-bfloat16]", "test_jit_eager_vmap_remat_agree",
    "test_token_logprobs[options1]",
})


class TestPallasTpuInterpret(LinearCrossEntropyTestBase):
  """The sweeps of the base through the TPU kernels in the interpreter (DEFAULT_CASES unless
  CCE_JAX_SLOW_TESTS=1)."""

  implementation = "pallas_tpu"
  extra = {"config": SUITE_CONFIG, "interpret": True}

  @pytest.fixture(autouse=True)
  def _default_cases(self, request):
    if request.node.name not in DEFAULT_CASES and not os.environ.get("CCE_JAX_SLOW_TESTS"):
      pytest.skip("slow in the TPU interpreter; CCE_JAX_SLOW_TESTS=1 runs it")

  def test_check_grads_f64(self, monkeypatch):
    """The base's finite differences; jax 0.11's TPU interpreter returns f32 from a kernel's f64 buffers, so there
    the kernels run in Pallas's generic interpreter."""
    if jax.__version_info__ < (0, 12):
      monkeypatch.setattr(tpu_tiles, "interpret_params", lambda interpret: bool(interpret))
    super().test_check_grads_f64()

  def test_jit_eager_vmap_remat_agree(self, monkeypatch):
    """The base's check with the kernels in Pallas's generic interpreter: jax.checkpoint cannot differentiate the
    TPU interpreter's host callbacks (IO effects), which a compiled kernel does not have. (vmap in the TPU
    interpreter: test_vmap_in_the_tpu_interpreter.)"""
    monkeypatch.setattr(tpu_tiles, "interpret_params", lambda interpret: bool(interpret))
    super().test_jit_eager_vmap_remat_agree()


def test_default_cases_name_base_cases(request):
  """Every name in DEFAULT_CASES is a case of the base (a misspelt one would silently never run)."""
  names = {item.name for item in request.session.items if item.cls is TestPallasTpuInterpret}
  if len(names) < 54:
    pytest.skip("the base's cases are not all collected in this run")
  assert DEFAULT_CASES <= names, DEFAULT_CASES - names


def test_vmap_in_the_tpu_interpreter():
  """vmap adds a grid dimension to each kernel: the gradient of a vmapped loss equals the reference's."""
  cfg = PallasTpuConfig(block_n=8, block_v=128, block_d=128, grad_block_n=8, grad_block_v=128, grad_block_d=128)
  e, c, targets, _ = helpers.make_inputs(5, (3, 11), 24, 200)
  loss = lambda impl, **kw: lambda e, c, t: cce_jax.linear_cross_entropy(e, c, t, softcap=5.0, implementation=impl,
                                                                         **kw)
  total = lambda f: lambda e, c: jnp.sum(jax.vmap(f, in_axes=(0, None, 0))(e, c, targets))
  grads = jax.jit(jax.grad(total(loss("pallas_tpu", config=cfg, interpret=True)), argnums=(0, 1)))(e, c)
  want = jax.grad(total(loss("reference")), argnums=(0, 1))(e, c)
  for g, r in zip(grads, want):
    assert helpers.rel_err(g, r) <= helpers.F32_RTOL


def _loss_and_grads(impl, e, c, bias, targets, **kw):
  def f(e, c, bias):
    loss, lse = cce_jax.linear_cross_entropy(e, c, targets, bias=bias, implementation=impl, reduction="none",
                                             return_lse=True, **kw)
    r = jax.random.uniform(jax.random.key(1), loss.shape, minval=0.5, maxval=1.5)
    return jnp.sum(loss * r) + jnp.sum(lse * r[::-1]), (loss, lse)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(e, c, bias)


def test_edge_blocks_in_every_dimension():
  """Blocks of 8 × 128 × 128 (the smallest legal) over N, V, D that are not multiples of them (4 blocks of N, 3 of
  V, 2 of D), with bias, softcap and label smoothing: losses, LSE and gradients against the reference, finite."""
  n, d, v = 29, 130, 257
  cfg = PallasTpuConfig(block_n=8, block_v=128, block_d=128, grad_block_n=8, grad_block_v=128, grad_block_d=128)
  e, c, targets, bias = helpers.make_inputs(n + d + v, (n,), d, v, bias=True, ignore_frac=0.2)
  kw = dict(softcap=3.0, label_smoothing=0.1, z_loss=1e-3)
  (_, (loss, lse)), grads = _loss_and_grads("pallas_tpu", e, c, bias, targets, config=cfg, interpret=True, **kw)
  (_, (ref_loss, ref_lse)), ref_grads = _loss_and_grads("reference", e, c, bias, targets, **kw)
  assert helpers.rel_err(loss, ref_loss) <= helpers.F32_RTOL
  assert helpers.rel_err(lse, ref_lse) <= helpers.F32_RTOL
  for g, r in zip(grads, ref_grads):
    assert helpers.rel_err(g, r) <= helpers.F32_RTOL


def test_filter_skips_whole_tiles():
  """With filter_eps the backward drops exactly the [grad_block_n, grad_block_v] tiles whose |softmax - onehot|
  is below it everywhere (a float64 NumPy derivation on peaked inputs, where half of the tiles are dropped)."""
  n, d, v, bn, bv = 16, 32, 1280, 8, 128
  e, c, targets, _ = helpers.make_inputs(31, (n,), d, v, regime="peaked")
  e = e + 6.0 * c[targets]  # confident: half of the tiles fall below eps
  cfg = PallasTpuConfig(block_n=8, block_v=128, block_d=128, grad_block_n=bn, grad_block_v=bv, grad_block_d=128)
  eps = 1e-3
  grad = jax.jit(jax.grad(lambda e, c: cce_jax.linear_cross_entropy(
      e, c, targets, reduction="sum", filter_eps=eps, implementation="pallas_tpu", config=cfg, interpret=True),
                          argnums=(0, 1)))
  de, dc = grad(e, c)
  e64, c64 = np.asarray(e, np.float64), np.asarray(c, np.float64)
  z = e64 @ c64.T
  p = np.exp(z - z.max(1, keepdims=True))
  ds = p / p.sum(1, keepdims=True) - np.eye(v)[np.asarray(targets)]
  tile_max = np.abs(ds).reshape(n // bn, bn, v // bv, bv).max(axis=(1, 3))
  keep = np.repeat(np.repeat(tile_max >= eps, bn, 0), bv, 1)
  assert 0.3 < keep.mean() < 0.7
  kept = np.where(keep, ds, 0.0)
  assert helpers.rel_err(de, kept @ c64) < 1e-4 and helpers.rel_err(dc, kept.T @ e64) < 1e-4
  assert helpers.rel_err(kept @ c64, ds @ c64) > 1e-3  # the filter changed the gradient


def test_auto_picks_pallas_tpu_on_tpu_only():
  pick = functools.partial(validation.resolve_implementation, "auto", False, None)
  assert pick(platform="tpu") == "pallas_tpu"
  assert pick(platform="gpu") == "pallas_gpu"
  assert pick(platform="cpu") == "xla_chunked"
  assert validation.resolve_implementation("auto", True, None, platform="tpu") == "pallas_gpu"  # as before
  assert validation.resolve_implementation("pallas_tpu", True, SUITE_CONFIG, platform="cpu") == "pallas_tpu"


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the message on machines without a TPU")
def test_pallas_tpu_without_tpu_points_to_interpret():
  e, c, targets, _ = helpers.make_inputs(0, (4,), 8, 10)
  with pytest.raises(ValueError, match="interpret=True"):
    cce_jax.linear_cross_entropy(e, c, targets, implementation="pallas_tpu")


@pytest.mark.parametrize("config,error,match", [
    (dict(block_n=12), ValueError, r"block_n must be a positive multiple of 8, got 12"),
    (dict(block_v=200), ValueError, r"block_v must be a positive multiple of 128"),
    (dict(grad_block_d=0), ValueError, r"grad_block_d must be a positive multiple of 128"),
    (dict(generation="v3"), ValueError, r"generation must be one of"),
    (dict(vmem_limit_bytes=-1), ValueError, r"vmem_limit_bytes"),
])
def test_config_rejects(config, error, match):
  with pytest.raises(error, match=match):
    PallasTpuConfig(**config)


def test_config_vmem_budget():
  """The default forward tiles sit above each generation's ridge point and, with the backward's, fit its VMEM at
  the benchmark hidden sizes, in multiples of the MXU width; tiles that do not fit are refused in one line."""
  for generation in ("v4", "v5e", "v5p", "v6e"):
    for d in (2304, 4096, 8192):
      cfg = PallasTpuConfig.for_shape(8192, 256000, d, generation=generation)
      cfg.check_vmem(8192, 256000, d, 4)
      mxu = 256 if generation == "v6e" else 128
      assert cfg.block_n % mxu == 0 and cfg.grad_block_v % mxu == 0
      assert min(cfg.block_n, cfg.block_v) >= tpu_config.GENERATIONS[generation].ridge  # above the ridge point
  with pytest.raises(ValueError, match=r"^PallasTpuConfig: the fused backward tiles need .* v4's 12 MiB budget"):
    PallasTpuConfig(block_n=256, block_v=256, grad_block_n=1024, grad_block_v=1024,
                    generation="v4").check_vmem(8192, 256000, 4096, 2)
  cfg = PallasTpuConfig(block_n=64, block_v=1024)
  assert cfg.tiles(40, 300, 96) == (40, 300, 96, 40, 300, 96)  # whole dimensions
  assert cfg.tiles(4096, 5000, 4096)[:3] == (64, 1024, 512)


@pytest.mark.parametrize("kind,generation", [("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"),
                                             ("TPU v5", "v5p"), ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"),
                                             ("TPU v6e", "v6e"), ("NVIDIA H200", None)])
def test_generation_of_device_kind(kind, generation):
  assert tpu_config.generation_of(kind) == generation


@pytest.mark.parametrize("dtype,backward,generation", [(jnp.bfloat16, "fused", "v5p"), (jnp.float32, "fused", "v5e"),
                                                      (jnp.bfloat16, "split", "v5e")])
def test_kernels_lower_to_mosaic_for_tpu(dtype, backward, generation, monkeypatch):
  """Forward and backward lower to Mosaic TPU custom calls (the Pallas TPU lowering runs without a TPU), with
  edge blocks in every dimension, a bias, a softcap and the filter; token_logprobs too. The fused backward on
  v5p splits its vocabulary blocks over two cores (four blocks: two each)."""
  n, d, v = 100, 640, 1000
  cfg = PallasTpuConfig(block_n=64, block_v=256, block_d=256, grad_block_n=64, grad_block_v=256, grad_block_d=256,
                        generation=generation, backward=backward)
  e, c = jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((v, d), dtype)
  b, t = jax.ShapeDtypeStruct((v,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32)
  resolve = validation.resolve_implementation  # dispatch asks the default backend; the lowering targets a TPU
  monkeypatch.setattr(validation, "resolve_implementation", lambda *a, platform: resolve(*a, platform="tpu"))
  loss = lambda **kw: lambda e, c, b, t: cce_jax.linear_cross_entropy(
      e, c, t, bias=b, softcap=30.0, z_loss=1e-4, implementation="pallas_tpu", config=cfg, **kw)
  logp = lambda e, c, t: sum(jnp.sum(x) for x in cce_jax.token_logprobs(
      e, c, t, temperature=0.8, return_entropy=True, implementation="pallas_tpu", config=cfg))
  for fn, args in ((jax.grad(loss(label_smoothing=0.1, filter_eps=None), argnums=(0, 1, 2)), (e, c, b, t)),
                   (jax.grad(loss(filter_eps=1e-4), argnums=(0, 1, 2)), (e, c, b, t)),
                   (jax.grad(logp, argnums=(0, 1)), (e, c, t))):
    text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    kernels = 2 if backward == "fused" else 3  # cce_tpu_fwd and cce_tpu_bwd, or cce_tpu_de and cce_tpu_dc
    assert text.count("tpu_custom_call") == kernels, text[:2000]


def _check_vocabulary_split():
  """In a process with two CPU devices: `cce_jax.sharded` with the classifier split over them through the TPU
  kernels, against the reference on one device (label smoothing spans both devices' rows; z-loss, softcap, bias,
  weights; the gradients of e, c and bias)."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()), ("model",))
  assert len(jax.devices()) == 2
  n, d, v = 20, 136, 400  # each device's 200 rows cross 128-row tile edges; D crosses a 128 block
  e, c, targets, bias = helpers.make_inputs(3, (n,), d, v, ignore_frac=0.15, bias=True)
  weights = jax.random.uniform(jax.random.key(4), (n,), minval=0.5, maxval=1.5)
  opts = dict(weights=weights, label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
  cfg = PallasTpuConfig(block_n=8, block_v=128, block_d=128, grad_block_n=8, grad_block_v=128, grad_block_d=128)
  split = lambda e, c, b: cce_jax.sharded.linear_cross_entropy(
      e, c, targets, bias=b, mesh=mesh, vocab_axes="model", implementation="pallas_tpu", interpret=True,
      config=cfg, **opts)
  ref = lambda e, c, b: cce_jax.linear_cross_entropy(e, c, targets, bias=b, implementation="reference", **opts)
  got = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))(e, c, bias)
  want = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2)))(e, c, bias)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert helpers.rel_err(x, y) <= helpers.F32_RTOL, (x, y)


def test_vocabulary_split_over_two_devices():
  helpers.run_with_cpu_devices("""
      from tests.ops.linear_cross_entropy import test_pallas_tpu as t
      t._check_vocabulary_split()
      print("OK")
  """, devices=2)
