"""Scaling laws: one module per family, each a `Law` (base.py); `LAWS` maps names to laws."""

from cce_jax.scaling.laws.base import Law as Law
from cce_jax.scaling.laws.chinchilla import CHINCHILLA as CHINCHILLA
from cce_jax.scaling.laws.chinchilla import CHINCHILLA_TIED as CHINCHILLA_TIED

LAWS = {law.name: law for law in (CHINCHILLA, CHINCHILLA_TIED)}


def get_law(name: str) -> Law:
  if name not in LAWS:
    raise ValueError(f"unknown law {name!r}; choose from {sorted(LAWS)}")
  return LAWS[name]
