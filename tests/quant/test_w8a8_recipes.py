"""W8A8 (quant/w8a8_recipes.py, `quantize_model(act_quant=...)`, `dot.fake_quantize_activations`): activation
fake-quantization against NumPy, the dots reading it from the Params' metadata, fake and native per-token dots
agreeing, smoothing cutting per-tensor W8A8's error on a decoder with outlier channels, and
`experiments/quantize.py --recipes=<W8A8> --calib_files=...` end to end with its one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from cce_jax import models
from cce_jax import quant
from cce_jax.quant import calibrate
from cce_jax.quant import dot
from cce_jax.quant import w8a8_recipes
from cce_jax.training import config as config_lib
from cce_jax.training import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "quantize.py"
CFG = models.Config(V=64, D=48, H=4, KV=2, L=2, F=80, T=24, dtype="float32", init_std=0.15)


def _np_fake(x, axes, fmt):
  """float64 NumPy: per-block amax scales, int8 (round half to even, ±127) or e4m3 (ml_dtypes' cast) codes."""
  x = np.asarray(x, np.float64)
  a = np.abs(x).max(axis=axes, keepdims=True)
  top = 127.0 if fmt == "int8" else 448.0
  s = np.where(a > 0, a / top, 1.0)
  if fmt == "int8":
    return np.clip(np.round(x / s), -127, 127) * s
  return (x / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s


@pytest.mark.parametrize("fmt,granularity,spec,shape,axes", [
    ("int8", "token", "btd,df->btf", (2, 5, 7), (2,)),
    ("int8", "tensor", "btd,df->btf", (2, 5, 7), (0, 1, 2)),
    ("int8", "token", "bthk,hkd->btd", (2, 3, 4, 6), (2, 3)),  # wo contracts heads and head_dim
    ("fp8_e4m3", "token", "btd,dhk->bthk", (3, 4, 9), (2,)),
    ("fp8_e4m3", "tensor", "btf,fd->btd", (3, 4, 9), (0, 1, 2)),
])
def test_fake_activation_quantization_matches_numpy(fmt, granularity, spec, shape, axes):
  rng = np.random.default_rng(len(shape) + len(axes))
  x = (rng.standard_t(3, shape) * np.exp(rng.normal(0, 1, shape[-1]))).astype(np.float32)
  x[0, 1] = 0.0  # a zero token decodes to zeros
  got = np.asarray(dot.fake_quantize_activations(spec, jnp.asarray(x), fmt, granularity))
  expected = _np_fake(x, axes, fmt)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(x).max())
  assert np.all(got[0, 1] == 0) and got.dtype == np.float32
  assert np.abs(got - x).max() > 0  # it did quantize


def test_einsum_quantizes_activations_from_the_param_metadata():
  rng = np.random.default_rng(3)
  x = rng.normal(0, 1, (2, 5, 16)).astype(np.float32) * np.where(np.arange(16) == 3, 30.0, 1.0)
  w = rng.normal(0, 0.2, (16, 11)).astype(np.float32)
  q = quant.quantize(jnp.asarray(w), "int8", axis=0, group_size="channel")
  wq = np.asarray(q.dequantize(), np.float64)
  for granularity, axes in (("token", (2,)), ("tensor", (0, 1, 2))):
    var = nnx.Param(q, act_quant=(quant.get_format("int8"), granularity))
    got = np.asarray(jax.jit(lambda x, v: dot.einsum("btd,df->btf", x, v, dtype=jnp.float32))(x, var))
    np.testing.assert_allclose(got, _np_fake(x, axes, "int8") @ wq, rtol=1e-5, atol=1e-5)
  plain = np.asarray(dot.einsum("btd,df->btf", x, nnx.Param(q), dtype=jnp.float32))
  np.testing.assert_allclose(plain, x @ wq, rtol=1e-5, atol=1e-5)  # no metadata: weight-only


def _model(seed=0):
  """A random decoder with a few 40x channels in every RMSNorm scale: activation outliers, as trained LLMs have."""
  model = models.make_model(CFG, seed)
  gain = np.ones(CFG.D, np.float32)
  gain[np.random.default_rng(seed).choice(CFG.D, 3, replace=False)] = 40.0
  for block in model.blocks:
    for norm in (block.attn_norm, block.mlp_norm):
      calibrate._write(norm.scale, calibrate._read(norm.scale) * gain)  # pylint: disable=protected-access
  return model


def _tokens(n, seed):
  return np.random.default_rng(seed).integers(0, CFG.V, n).astype(np.int32)


def test_smoothing_cuts_per_tensor_w8a8_error_and_rows_have_the_fields():
  names = ["w8a8_int8", "w8a8_int8_token", "smoothquant_w8a8", "smoothquant_w8a8_tensor"]
  rows = w8a8_recipes.compare(_model(), _tokens(4 * 24 + 1, 1), names, seq_len=24, batch_size=4,
                              calib_tokens=_tokens(4 * 24, 2))
  assert [r["recipe"] for r in rows] == [w8a8_recipes.BASELINE] + names
  kl = {r["recipe"]: r["kl"] for r in rows}
  assert all(kl[n] > 0 for n in names)
  assert kl["smoothquant_w8a8_tensor"] < 0.4 * kl["w8a8_int8"], kl  # per tensor: smoothing helps most
  assert kl["smoothquant_w8a8"] < kl["w8a8_int8_token"] < kl["w8a8_int8"], kl
  for r in rows[1:]:
    assert 8 < r["bits_per_weight"] < 9 and r["tokens"] == 4 * 24 and len(r["notes"]) == 1
  assert "per tensor" in rows[1]["notes"][0] and "SmoothQuant alpha 0.5" in rows[3]["notes"][0]


@pytest.mark.parametrize("name", ["w8a8_int8_token", "w8a8_fp8"])
def test_native_and_fake_per_token_dots_agree(name):
  model = _model()
  windows = jnp.asarray(_tokens(2 * 24, 3).reshape(2, 24))
  fake = w8a8_recipes.quantize(model, name)
  native = w8a8_recipes.quantize(model, name, native_dots=True)
  assert dot.is_native(native.blocks[0].attn.wq) and not dot.is_native(fake.blocks[0].attn.wq)
  h_fake, h_native = np.asarray(fake(windows)), np.asarray(native(windows))
  np.testing.assert_allclose(h_native, h_fake, rtol=1e-4, atol=1e-4 * np.abs(h_fake).max())
  weight_only = np.asarray(quant.quantize_model(model, "int8" if name.endswith("token") else "fp8_e4m3")(windows))
  assert np.abs(weight_only - h_fake).max() > 1e-4 * np.abs(h_fake).max()  # activations are quantized too


def test_bad_arguments_are_one_line_errors():
  model = models.make_model(CFG, 0)
  with pytest.raises(ValueError, match="native_dots or act_quant, not both"):
    quant.quantize_model(model, "int8", native_dots=True, act_quant=("int8", "token"))
  with pytest.raises(ValueError, match="act_quant must be"):
    quant.quantize_model(model, "int8", act_quant=("int8", "channel"))
  with pytest.raises(ValueError, match="activation granularity"):
    dot.fake_quantize_activations("btd,df->btf", jnp.ones((1, 2, 3)), "int8", "row")
  with pytest.raises(ValueError, match="unknown W8A8 recipe 'w8a16'"):
    w8a8_recipes.quantize(model, "w8a16")
  with pytest.raises(ValueError, match="needs calibration statistics"):
    w8a8_recipes.quantize(model, "smoothquant_w8a8")
  with pytest.raises(ValueError, match="need calibration tokens"):
    w8a8_recipes.compare(model, _tokens(49, 0), ["smoothquant_w8a8"], seq_len=24)
  assert w8a8_recipes.needs_calibration("smoothquant_w8a8") and not w8a8_recipes.needs_calibration("w8a8_fp8")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny train.py run (D=64, L=1, V=300, 4 steps) on generated text files, and a folder of other text."""
  tmp = tmp_path_factory.mktemp("run")
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("etaoinshrdlu"), rng.integers(2, 7))) for _ in range(120)]
  for folder, n in (("corpus", 30), ("other", 3)):
    (tmp / folder).mkdir()
    for i in range(n):
      (tmp / folder / f"d{i}.txt").write_text(" ".join(rng.choice(words, 300)) + "\n")
  (tmp / "short.txt").write_text("a few words\n")
  cfg = config_lib.base_config()
  cfg.update(dict(data=str(tmp / "corpus" / "*.txt"), data_cache=str(tmp / "cache"), val_fraction=0.2,
                  vocab_size=300, seq_len=32, batch_size=4, steps=4, checkpoint_every=4, eval_every=0, plot=False))
  cfg.model.update(D=64, H=2, KV=1, L=1, F=96, dtype="float32")
  cfg.optim.update(warmup_steps=1)
  trainer.train(cfg, str(tmp / "run"))
  return tmp


def _run(*args):
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)


def test_script_runs_w8a8_recipes_calibrated_on_text_files(workdir, tmp_path):
  out = tmp_path / "q"
  proc = _run(f"--workdir={workdir / 'run'}", "--recipes=int8,smoothquant_w8a8,w8a8_int8", f"--out={out}",
              "--eval_tokens=128", "--calib_tokens=200", f"--calib_files={workdir / 'other'}/*.txt,{workdir}/x*.md")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("[")]
  assert lines == ["[0/3] fp (baseline)", "[1/3] int8", "[2/3] smoothquant_w8a8", "[3/3] w8a8_int8"]
  data = json.loads((out / "results.json").read_text())
  assert [r["recipe"] for r in data["rows"]] == [w8a8_recipes.BASELINE, "int8", "smoothquant_w8a8", "w8a8_int8"]
  base, int8, smooth, per_tensor = data["rows"]
  assert all(r["tokens"] == 128 and abs(r["kl"]) < 1e-2 for r in data["rows"])  # 4 steps: KL near rounding
  assert smooth["perplexity"] != int8["perplexity"] != per_tensor["perplexity"]  # activations are quantized
  assert abs(per_tensor["perplexity"] / base["perplexity"] - 1) < 0.01
  assert data["meta"]["calibration"].startswith("200 tokens of 3 files matching ")
  assert data["meta"]["w8a8_dots"] == "fake-quantized"


def test_script_calib_files_errors_are_one_line(workdir, tmp_path):
  for files, message in ((f"{tmp_path}/none*.txt", f"--calib_files={tmp_path}/none*.txt matches no file"),
                         (str(workdir / "short.txt"), "make no calibration window of 32 tokens")):
    proc = _run(f"--workdir={workdir / 'run'}", "--recipes=smoothquant_w8a8", f"--out={tmp_path / 'o'}",
                f"--calib_files={files}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  proc = _run(f"--workdir={workdir / 'run'}", "--recipes=int8", f"--out={tmp_path / 'o'}",
              f"--calib_files={workdir}/x*.md")  # no calibrated recipe: the files would be ignored
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and "no recipe of --recipes=int8 is calibrated" in lines[0]
