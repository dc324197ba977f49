"""Quantization transforms over Flax parameter pytrees (`cce_jax.quant`; docs/quantization.md).

Formats (`cce_jax.quant.formats`): int8/int4/int3/int2, uint8/uint4/uint3, fp8_e4m3/fp8_e5m2, mxfp8/mxfp6/mxfp4,
nvfp4, nf4. `quantize(x, fmt, *, axis=0, group_size=None) -> QArray`, `QArray.dequantize()`, `fake_quantize`.
Parameter trees and models: `quantize_params` / `dequantize_params` / `size_report` by recipes; `quantize_model`
(a decoder whose Params hold QArrays, dequantized on the fly or through native 8-bit dots: `dot`).
Calibrated methods per layer: `gptq` (with `hessian_init` / `hessian_update`), `awq` (with `fold_scale` /
`scale_input`), `smoothquant_scales` and `w8a8_matmul`; over a decoder, block by block: `calibrated_quantize`,
`calibration_stats`, and `smoothquant` (migration scales folded into the RMSNorm scales and w3; W8A8 recipes in
`cce_jax.quant.w8a8_recipes`). `evaluate(model_fp, model_q, tokens)`: perplexity, KL divergence, top-1
agreement, Δp. The function names `evaluate`, `gptq`, `awq` and `smoothquant` hide their modules' names: import
helpers from the modules (`from cce_jax.quant.awq import ...`).
"""

from cce_jax.quant import dot
from cce_jax.quant import formats
from cce_jax.quant import recipes
from cce_jax.quant.apply import model_size_report, quantize_model
from cce_jax.quant.awq import awq, fold_scale, scale_input
from cce_jax.quant.calibrate import calibrated_quantize, calibration_stats
from cce_jax.quant.evaluate import Baseline, baseline, evaluate
from cce_jax.quant.formats import Format, get_format
from cce_jax.quant.fp_search import fp_search
from cce_jax.quant.gptq import gptq
from cce_jax.quant.hessian import HessianState, hessian_init, hessian_update
from cce_jax.quant.params import dequantize_params, quantize_params, size_report
from cce_jax.quant.qarray import QArray
from cce_jax.quant.quantize import fake_quantize, quantize
from cce_jax.quant.recipes import Rule
from cce_jax.quant.smoothquant import smoothquant, smoothquant_scales, w8a8_matmul

__all__ = [
    "Baseline", "Format", "HessianState", "QArray", "Rule", "awq", "baseline", "calibrated_quantize",
    "calibration_stats", "dequantize_params", "dot", "evaluate", "fake_quantize", "fold_scale", "formats",
    "fp_search", "get_format", "gptq", "hessian_init", "hessian_update", "model_size_report", "quantize",
    "quantize_model", "quantize_params", "recipes", "scale_input", "size_report", "smoothquant",
    "smoothquant_scales", "w8a8_matmul",
]
