"""Searched low-bit floats (quant/fp_search.py, quant/formats/fpx.py) against NumPy references written here.

Grids enumerated in float64 from the E/M definition; the two-level scale rule transcribed with ml_dtypes' e4m3;
output errors in float64 on synthetic layers with correlated, outlier-heavy inputs.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cce_jax import quant
from cce_jax.quant import dot
from cce_jax.quant.fp_search import fp_choice, fp_search_activations, fp_search_losses
from cce_jax.quant.formats import fpx


def _grid(e, m):
  """The non-negative values of the E/M grid (bias 2^(E−1) − 1, no inf/NaN), float64, sorted."""
  emin, emax = 2 - 2 ** (e - 1), 2 ** (e - 1)
  vals = {k * 2.0 ** (emin - m) for k in range(2 ** m)}
  vals |= {(1 + k / 2 ** m) * 2.0 ** ex for ex in range(emin, emax + 1) for k in range(2 ** m)}
  return np.array(sorted(vals))


def _layer(seed=0, n=256, d=128, out=64):
  """x [n, d]: low-rank correlated channels with log-normal per-channel magnitudes (a few large outliers)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) + 0.3 * rng.standard_normal((n, d))
  x *= np.exp(1.2 * rng.standard_normal(d))
  w = 0.05 * rng.standard_normal((d, out))
  return x.astype(np.float32), w.astype(np.float32)


def _err(x, wq, w):
  x = np.asarray(x, np.float64)
  return float(np.sum((x @ (np.asarray(wq, np.float64) - np.asarray(w, np.float64))) ** 2))


def _numpy_fake(w, e, clip, g=32):
  """The two-level rule of formats/fpx.py in float64 (e4m3 block scales by ml_dtypes), w [K, N] along axis 0."""
  m = 3 - e
  grid = _grid(e, m)
  top = grid[-1]
  t = np.max(np.abs(w))
  gt = np.float32(t) / np.float32(top * 448.0)
  wb = w.astype(np.float64).T.reshape(w.shape[1], -1, g)
  amax = np.max(np.abs(wb), axis=-1, keepdims=True)
  b = (np.float32(clip) * amax.astype(np.float32) / np.float32(top) / gt).astype(np.float32)
  b = b.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  v = np.abs(wb) / (b * gt)
  r = grid[np.argmin(np.abs(v[..., None] - grid), axis=-1)]
  return (np.sign(wb) * r * b * gt).reshape(w.shape[1], -1).T


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_every_code_decodes_to_the_numpy_grid_and_back(bits):
  for e in range(1, bits):
    m = bits - 1 - e
    grid = _grid(e, m)
    codes = jnp.arange(2 ** bits, dtype=jnp.uint8)
    vals = np.asarray(fpx.from_code(codes, e, m), np.float64)
    np.testing.assert_array_equal(np.sort(np.unique(np.abs(vals))), grid)
    assert np.sum(vals < 0) == 2 ** (bits - 1) - 1  # every code but −0 distinct
    nonneg = jnp.asarray(grid, jnp.float32)
    np.testing.assert_array_equal(fpx.from_code(fpx.to_code(nonneg, e, m), e, m), nonneg)
    np.testing.assert_array_equal(fpx.from_code(fpx.to_code(-nonneg, e, m), e, m), -nonneg)
    assert float(fpx.grid_max(e, m)) == grid[-1]


def test_4bit_grids_are_the_documented_ones():
  np.testing.assert_array_equal(_grid(2, 1), [0, 0.5, 1, 1.5, 2, 3, 4, 6])
  np.testing.assert_array_equal(_grid(1, 2), np.arange(8) / 2)
  np.testing.assert_array_equal(_grid(3, 0), [0, 0.25, 0.5, 1, 2, 4, 8, 16])


@pytest.mark.parametrize("e", [1, 2, 3])
def test_round_grid_is_nearest_and_saturates(e):
  m = 3 - e
  grid = _grid(e, m)
  v = np.random.default_rng(e).uniform(-1.3 * grid[-1], 1.3 * grid[-1], 4001).astype(np.float32)
  want = np.sign(v) * grid[np.argmin(np.abs(np.abs(v)[:, None] - grid), axis=1)]
  np.testing.assert_array_equal(np.asarray(fpx.round_grid(jnp.asarray(v), e, m), np.float64), want)


def test_e2m1_at_block_16_is_nvfp4_and_the_numpy_rule():
  w = np.random.default_rng(3).standard_normal((96, 40)).astype(np.float32)
  a = quant.quantize(w, "fp4_e2m1", group_size=16).dequantize()
  np.testing.assert_array_equal(a, quant.quantize(w, "nvfp4").dequantize())
  for e, clip in ((1, 1.0), (2, 0.7), (3, 0.85)):
    q = quant.quantize(w, quant.get_format(f"fp4_e{e}m{3 - e}", clip=clip), group_size=32)
    np.testing.assert_allclose(np.asarray(q.dequantize(), np.float64), _numpy_fake(w, e, clip), rtol=1e-6,
                               atol=1e-7)


def test_losses_match_a_float64_transcription():
  x, w = _layer(seed=2, d=96, out=40)
  losses = np.asarray(fp_search_losses(w, x, clips=(1.0, 0.8)))
  assert losses.shape == (3, 2, 40)
  for (si, e), (ci, c) in itertools.product(enumerate((2, 1, 3)), enumerate((1.0, 0.8))):
    xd = x.astype(np.float64) @ (_numpy_fake(w, e, c) - w)
    np.testing.assert_allclose(losses[si, ci], np.sum(xd ** 2, axis=0), rtol=2e-4)


@pytest.mark.parametrize("seed,shape", [(0, (128, 64)), (1, (96, 40))])
def test_searched_is_never_worse_than_plain_e2m1(seed, shape):
  x, w = _layer(seed=seed, d=shape[0], out=shape[1])
  w = w * np.exp(np.random.default_rng(seed).standard_normal(shape[1]))[None, :].astype(np.float32)
  plain = _err(x, quant.quantize(w, "fp4_e2m1", group_size=32).dequantize(), w)
  by_x = _err(x, quant.fp_search(w, x).dequantize(), w)
  by_h = _err(x, quant.fp_search(w, hessian=x.T.astype(np.float64) @ x / len(x)).dequantize(), w)
  chan = _err(x, quant.fp_search(w, x, clip_per="channel").dequantize(), w)
  assert by_x <= plain * (1 + 1e-5) and by_h <= plain * (1 + 1e-5) and chan <= by_x * (1 + 1e-5), (
      plain, by_x, by_h, chan)
  # Restricted to e2m1 without clipping the search is plain e2m1 exactly.
  only = quant.fp_search(w, x, splits=(2,), clips=(1.0,))
  np.testing.assert_array_equal(only.dequantize(), quant.quantize(w, "fp4_e2m1", group_size=32).dequantize())


@pytest.mark.parametrize("kind,want", [("uniform", "e1m2"), ("heavy", "e3m0")])
def test_another_split_wins_by_a_margin(kind, want):
  x, _ = _layer(seed=4)
  rng = np.random.default_rng(4)
  w = rng.uniform(-1, 1, (128, 64)) if kind == "uniform" else rng.standard_t(1.5, (128, 64))
  w = (0.05 * w).astype(np.float32)
  q = quant.fp_search(w, x)
  assert fp_choice(q)[0] == want
  plain = _err(x, quant.quantize(w, "fp4_e2m1", group_size=32).dequantize(), w)
  assert _err(x, q.dequantize(), w) < 0.85 * plain


@pytest.mark.parametrize("clip_per", ["layer", "channel"])
def test_values_lie_on_the_chosen_grid(clip_per):
  x, w = _layer(seed=6, d=96, out=40)
  w = np.random.default_rng(6).standard_t(1.5, (96, 40)).astype(np.float32)
  q = quant.fp_search(w, x, clip_per=clip_per)
  name, scales = fp_choice(q)
  e = int(name[1])
  g = float(np.asarray(q.scale2)[0])
  deq = np.asarray(q.dequantize(), np.float64).T.reshape(40, 3, 32)
  scale = scales.astype(np.float64) * g  # [40, 3, 1]
  v = np.abs(deq / np.where(scale > 0, scale, 1.0))
  grid = _grid(e, 3 - e)
  assert np.max(np.min(np.abs(v[..., None] - grid), axis=-1)) < 1e-5 * grid[-1]
  assert q.fmt.name == "fp4_search" and q.dequantize().dtype == w.dtype and q.shape == w.shape


def test_jit_and_bits_per_weight():
  x, w = _layer(seed=7, d=64, out=48)
  w16 = jnp.asarray(w, jnp.bfloat16)
  q = quant.fp_search(w16, x)
  jq = jax.jit(lambda a, b: quant.fp_search(a, b, clip_per="channel"))(w16, x)
  eq = quant.fp_search(w16, x, clip_per="channel")
  np.testing.assert_array_equal(jq.dequantize(), eq.dequantize())
  assert q.dequantize().dtype == jnp.bfloat16
  # 4-bit codes, one 8-bit e4m3 scale per 32, and (g, E) as two fp32 per tensor.
  assert q.bits_per_weight == pytest.approx(4 + 8 / 32 + 64 / w.size)
  assert quant.quantize(w, "fp4_e2m1").bits_per_weight == q.bits_per_weight
  rt = jax.tree.map(lambda a: a, q)  # a pytree: leaves and static format survive a tree_map
  np.testing.assert_array_equal(rt.dequantize(), q.dequantize())


def test_data_free_search_is_never_worse_on_the_weights():
  w = np.random.default_rng(8).standard_t(2.0, (64, 32)).astype(np.float32)
  err = lambda f: float(np.sum((np.asarray(quant.fake_quantize(w, f), np.float64) - w) ** 2))
  assert err("fp4_search") <= min(err("fp4_e1m2"), err("fp4_e2m1"), err("fp4_e3m0")) * (1 + 1e-6)


def test_bad_input_gives_one_line_errors():
  x, w = _layer(seed=9, d=64, out=16)
  cases = [
      (dict(w=w[0], x=x), "expects a float kernel w"),
      (dict(w=w, x=x[:, :10]), r"x must be \[n, 64\]"),
      (dict(w=w, x=None), "exactly one of x"),
      (dict(w=w, x=x, hessian=np.eye(64)), "exactly one of x"),
      (dict(w=w, x=None, hessian=np.eye(10)), r"hessian must be \[64, 64\]"),
      (dict(w=w, x=x, bits=9), "bits must be one of"),
      (dict(w=w, x=x, splits=(0,)), "splits must be exponent widths in 1..3"),
      (dict(w=w, x=x, clips=(1.5,)), r"clips must be ratios in \(0, 1\]"),
      (dict(w=w, x=x, clip_per="block"), "clip_per must be one of"),
      (dict(w=w, x=x, group_size=24), "group_size=24 must divide the size 64"),
      (dict(w=w, x=np.where(x > 3, np.nan, x)), "contains NaN or Inf"),
  ]
  for kwargs, msg in cases:
    with pytest.raises(ValueError, match=msg) as info:
      quant.fp_search(**kwargs)
    assert "\n" not in str(info.value)
  for bad in (dict(bits=9), dict(ebits=4), dict(clip=0.0)):
    with pytest.raises(ValueError) as info:
      fpx.FPFormat("fp", **bad)
    assert "\n" not in str(info.value)


def test_calibrated_pipeline_gives_searched_qarrays_in_the_rtn_layout():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from cce_jax import models  # pylint: disable=import-outside-toplevel
  from cce_jax.quant import calibrate, recipes  # pylint: disable=import-outside-toplevel
  from cce_jax.quant.fp_search import search_space  # pylint: disable=import-outside-toplevel
  cfg = models.Config(V=64, D=64, H=4, KV=2, L=1, F=96, T=32, dtype="float32", init_std=0.15)
  model = models.make_model(cfg, 0)
  tokens = np.random.default_rng(0).integers(0, cfg.V, 4 * 32).astype(np.int32)
  qm = calibrate.calibrated_quantize(model, tokens, "fp_search", "fp4_search", group_size=32, batch_size=4)
  rtn = quant.quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), recipes.decoder_rules("fp4_e2m1", 32))
  for path in ("attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w1", "mlp/w3", "mlp/w2"):
    q = calibrate._read(calibrate._get(qm.blocks[0], path))  # pylint: disable=protected-access
    r = rtn["blocks"][0]
    for part in path.split("/"):
      r = r[part]
    assert isinstance(q, quant.QArray) and q.fmt.name == "fp4_search", path
    # Same storage (wo's one block per head_dim may be laid out as "channel" or as one group).
    assert [a.size for a in jax.tree.leaves(q)] == [a.size for a in jax.tree.leaves(r)], path
    assert q.shape == r.shape and q.bits_per_weight == r.bits_per_weight, path
    assert fp_choice(q)[0] in ("e1m2", "e2m1", "e3m0")
  assert search_space(quant.get_format("fp4_search", clip=1.0)) == {"bits": 4, "splits": None, "clips": (1.0,)}
  with pytest.raises(ValueError, match="fp_search takes an fp"):
    search_space("int4")


@pytest.mark.parametrize("bits,granularity", [(4, "tensor"), (8, "token")])
def test_activation_search_beats_the_default_format(bits, granularity):
  x, w = _layer(seed=10, d=96, out=40)
  fmt, losses = fp_search_activations(x, w, bits=bits, granularity=granularity)
  losses = np.asarray(losses, np.float64)
  assert losses.shape == (bits - 1, len(fpx.CLIPS)) and fmt.bits == bits and fmt.ebits is not None
  # The chosen format, applied as the model applies activation formats, gives the minimum loss (float64 check).
  xq = np.asarray(dot.fake_quantize_activations("nk,kd->nd", jnp.asarray(x), fmt, granularity), np.float64)
  err = float(np.sum(((xq - x) @ w.astype(np.float64)) ** 2))
  np.testing.assert_allclose(err, losses.min(), rtol=1e-4)
  assert err < 0.6 * losses[0, 0], (err, losses[0, 0])  # the first candidate: e2m1 / e4m3 without clipping


def test_activation_search_errors():
  x, w = _layer(seed=11, d=64, out=16)
  for kwargs, msg in ((dict(granularity="channel"), "granularity must be one of"), (dict(bits=2), "bits must be")):
    with pytest.raises(ValueError, match=msg):
      fp_search_activations(x, w, **kwargs)
  with pytest.raises(ValueError, match=r"expects x \[n, K\] and w \[K, N\]"):
    fp_search_activations(x[:, :10], w)
