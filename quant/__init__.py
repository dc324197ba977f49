"""Quantization transforms over Flax parameter pytrees (`cce_jax.quant`).

Formats (`cce_jax.quant.formats`): int8/int4/int3/int2, uint8/uint4/uint3, fp8_e4m3/fp8_e5m2, mxfp8/mxfp6/mxfp4,
nvfp4, nf4. `quantize(x, fmt, *, axis=0, group_size=None) -> QArray`, `QArray.dequantize()`, `fake_quantize`.
`evaluate(model_fp, model_q, tokens)`: perplexity, KL divergence, top-1 agreement, Δp (docs/quantization.md).
"""

from cce_jax.quant import formats
from cce_jax.quant import recipes
from cce_jax.quant.formats import Format, get_format
from cce_jax.quant.params import dequantize_params, quantize_params, size_report
from cce_jax.quant.qarray import QArray
from cce_jax.quant.quantize import fake_quantize, quantize
from cce_jax.quant.recipes import Rule
from cce_jax.quant import dot
from cce_jax.quant.apply import model_size_report, quantize_model

__all__ = [
    "Format", "QArray", "Rule", "dequantize_params", "fake_quantize", "formats", "get_format", "quantize",
    "quantize_params", "recipes", "size_report",
    "dot", "model_size_report", "quantize_model",
]

# The evaluation harness (quant/evaluate.py); the name `evaluate` is the function, not the module.
from cce_jax.quant.evaluate import Baseline, baseline, evaluate  # pylint: disable=g-import-not-at-top

__all__ += ["Baseline", "baseline", "evaluate"]

# GPTQ (quant/gptq.py) and its Hessian accumulator (quant/hessian.py).
from cce_jax.quant.gptq import gptq  # pylint: disable=g-import-not-at-top
from cce_jax.quant.hessian import HessianState, hessian_init, hessian_update  # pylint: disable=g-import-not-at-top

__all__ += ["HessianState", "gptq", "hessian_init", "hessian_update"]

# Calibrated per-layer methods: AWQ (scale and clip search, folding) and SmoothQuant (quant/awq.py, smoothquant.py).
from cce_jax.quant.awq import awq, fold_scale, scale_input  # pylint: disable=g-import-not-at-top
from cce_jax.quant.smoothquant import smoothquant_scales, w8a8_matmul  # pylint: disable=g-import-not-at-top

__all__ += ["awq", "fold_scale", "scale_input", "smoothquant_scales", "w8a8_matmul"]

# Block-by-block calibration of a decoder and the calibrated methods (quant/calibrate.py).
from cce_jax.quant.calibrate import calibrated_quantize, calibration_stats  # pylint: disable=g-import-not-at-top

__all__ += ["calibrated_quantize", "calibration_stats"]
