"""Ops of cce_jax, one folder each."""
