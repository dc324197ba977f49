"""AWQ's scales of o and down are folded into wv and w3: those folds must reach the stored (quantized) kernels.

On a decoder whose attention values and up projections have outlier output channels (so AWQ picks scales far from
1 for o and down), AWQ at 8 bits stays about as close to full precision as 8-bit round to nearest; a fold applied
after wv or w3 was quantized leaves their stored values unscaled and the model far off.
"""

from __future__ import annotations

import numpy as np
import pytest

from cce_jax import models
from cce_jax import quant
from cce_jax.quant import calibrate
from cce_jax.quant import recipes

CFG = models.Config(V=64, D=64, H=4, KV=4, L=2, F=128, T=32, dtype="float32", init_std=0.15)


def _outlier_model(seed=0):
  model = models.make_model(CFG, seed)
  rng = np.random.default_rng(seed)
  for block in model.blocks:
    for param in (block.attn.wv, block.mlp.w3):  # outlier output channels: uneven inputs of o and down
      w = calibrate._read(param)  # pylint: disable=protected-access
      gain = np.exp(rng.normal(0.0, 1.5, w.shape[1:])).astype(np.float32)
      calibrate._write(param, w * gain)  # pylint: disable=protected-access
  return model


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_at_8_bits_is_as_close_as_rtn(method):
  model = _outlier_model()
  tokens = np.random.default_rng(1).integers(0, CFG.V, 8 * 32).astype(np.int32)
  base = quant.baseline(model, np.random.default_rng(7).integers(0, CFG.V, 8 * 32 + 1).astype(np.int32), seq_len=32)
  kl_rtn = quant.evaluate(base, quant.quantize_model(model, recipes.decoder_rules("int8", 32)), base.windows)["kl_mean"]
  qmodel = calibrate.calibrated_quantize(model, tokens, method, "int8", group_size=32, batch_size=8, grid=5)
  kl = quant.evaluate(base, qmodel, base.windows)["kl_mean"]
  assert kl < 2 * kl_rtn + 1e-6, (kl, kl_rtn)
