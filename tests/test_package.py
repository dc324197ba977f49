"""The installed package exposes its public names and the mapped sub-packages."""

from __future__ import annotations

import importlib


def test_public_surface():
  import cce_jax

  for name in ("linear_cross_entropy", "token_logprobs", "XlaChunkedConfig"):
    assert callable(getattr(cce_jax, name)), name


def test_models_and_quant_are_mapped_in():
  for name in ("cce_jax.models", "cce_jax.quant"):
    module = importlib.import_module(name)
    assert module.__doc__, name
