"""Benchmark harnesses of cce_jax's ops (not installed with the package; the scripts in experiments/ use them)."""
