"""Flax decoder language models that train with the fused loss (`cce_jax.models`).

Empty for now: the Llama-style decoder, its config and the loss hook land here.
"""
