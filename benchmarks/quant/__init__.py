"""Benchmarks of `cce_jax.quant`: `native_dots` (quantized-weight dots: dequantize on the fly vs fp8 / int8 GEMMs)
and `gptq_layer` (one layer's GPTQ against RTN: time and reconstruction error)."""
