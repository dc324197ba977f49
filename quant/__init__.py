"""Quantization transforms over Flax parameter pytrees (`cce_jax.quant`).

Empty for now: RTN, AWQ, GPTQ, SmoothQuant and the FP8/FP4/MX/NVFP4 formats land here.
"""
