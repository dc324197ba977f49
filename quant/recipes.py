"""Quantization recipes: ordered rules (regex over the parameter path → format and options), first match wins.

A parameter's path is its keys joined with "/" (e.g. "blocks/0/attn/wq"); a rule's `pattern` must match the whole
path (`re.fullmatch`). A rule with `format=None` keeps the matched parameters in full precision. Parameters that
no rule matches stay in full precision.

Named recipes (`get(name)`, `names()`) quantize the kernels of the decoder blocks (`cce_jax.models.Decoder`) and
leave the token embedding, the RMSNorm scales and the classifier (`head`) in full precision:

| name | format | blocks |
|---|---|---|
| `int8` | int8 | one scale per output channel |
| `int4_g128` | int4 | groups of 128 along the contraction axis |
| `uint4_g128` | uint4 | groups of 128 along the contraction axis (scale and zero point) |
| `fp8_e4m3` | fp8_e4m3 | one scale per output channel |
| `mxfp4` | mxfp4 | OCP MX: 32 elements, e8m0 scale |
| `nvfp4` | nvfp4 | 16 elements, e4m3 scale, fp32 per-tensor scale |
| `nf4` | nf4 | absmax per 64 elements |

Kernel layouts (models/layers.py) and the contraction axis each rule uses:

- `attn/wq`, `attn/wk`, `attn/wv` [D, heads, head_dim]: axis 0 (D); scales per (head, head_dim) output;
- `attn/wo` [H, head_dim, D]: it contracts over (H, head_dim); blocks run along axis 1 (head_dim), so a block never
  spans two heads, and the group size is clipped to head_dim when it is larger (`clip_group`; e.g. g128 with
  head_dim 64 uses groups of 64; "channel" gives one scale per (head, output));
- `mlp/w1`, `mlp/w3` [D, F] and `mlp/w2` [F, D]: axis 0.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any


@dataclasses.dataclass(frozen=True)
class Rule:
  """Parameters whose path fully matches `pattern` are quantized into `format` (None: kept in full precision).

  `axis`: the contraction axis; `group_size`: as in `quantize` (None: the format's default); `clip_group`: an int
  group size larger than the axis becomes the axis length.
  """
  pattern: str
  format: str | None
  axis: int = 0
  group_size: Any = None
  clip_group: bool = False

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from None

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None


_BLOCK = r"blocks/\d+/"


def decoder_rules(fmt: str, group_size=None) -> tuple[Rule, ...]:
  """Rules quantizing every kernel of the decoder blocks into `fmt` (layouts in the module docstring)."""
  return (
      Rule(_BLOCK + r"attn/w[qkv]", fmt, axis=0, group_size=group_size),
      Rule(_BLOCK + r"attn/wo", fmt, axis=1, group_size=group_size, clip_group=True),
      Rule(_BLOCK + r"mlp/w[123]", fmt, axis=0, group_size=group_size),
  )


_RECIPES = {
    "int8": ("int8", None),
    "int4_g128": ("int4", 128),
    "uint4_g128": ("uint4", 128),
    "fp8_e4m3": ("fp8_e4m3", None),
    "mxfp4": ("mxfp4", None),
    "nvfp4": ("nvfp4", None),
    "nf4": ("nf4", None),
}


def names() -> tuple[str, ...]:
  return tuple(_RECIPES)


def get(name: str) -> tuple[Rule, ...]:
  """The named recipe (module docstring) as a tuple of rules."""
  if name not in _RECIPES:
    raise ValueError(f"unknown recipe {name!r}; known: {', '.join(_RECIPES)}")
  return decoder_rules(*_RECIPES[name])


def as_rules(recipe) -> tuple[Rule, ...]:
  """A recipe name, or a sequence of `Rule`s / (pattern, format[, options dict]) tuples, as a tuple of rules."""
  if isinstance(recipe, str):
    return get(recipe)
  rules = []
  for r in recipe:
    if isinstance(r, Rule):
      rules.append(r)
    elif isinstance(r, (tuple, list)) and len(r) in (2, 3):
      rules.append(Rule(r[0], r[1], **(dict(r[2]) if len(r) == 3 else {})))
    else:
      raise TypeError(f"a recipe rule must be a Rule or (pattern, format[, options]), got {r!r}")
  return tuple(rules)
