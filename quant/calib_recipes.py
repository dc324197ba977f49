"""Named calibrated recipes for `experiments/quantize.py --recipes=...` (and `eval_recipes.compare`).

| name | method | format | groups |
|---|---|---|---|
| `rtn_w4_g128`, `rtn_w3_g128` | round to nearest (no calibration) | int4 / int3 | 128 |
| `gptq_w4_g128`, `gptq_w3_g128` | GPTQ | int4 / int3 | 128 |
| `gptq_w4_g128_act`, `gptq_w3_g128_act` | GPTQ, act-order (static groups) | int4 / int3 | 128 |
| `awq_w4_g128`, `awq_w3_g128` | AWQ (scale search, folding, clip search) | int4 / int3 | 128 |
| `awq_gptq_w4_g128`, `awq_gptq_w3_g128` | AWQ scales folded, then GPTQ | int4 / int3 | 128 |
| `e2m1_g32` | round to nearest (no calibration) | fp4_e2m1 | 32 |
| `fp4_wsearch_g32` | split and clip searched on the weights' own error (no calibration) | fp4_search | 32 |
| `fp4_search_g32` | `quant.fp_search`: split and clip searched on the output error (LLM-FP4) | fp4_search | 32 |
| `fp4_search_noclip_g32` | `quant.fp_search` of the split only (absmax scaling, clip 1) | fp4_search | 32 |

Symmetric int formats, as the RTN recipe `int4_g128`; `rtn_w4_g128` is that recipe under this table's name, so the
rows of one run compare like with like. The calibrated ones run `quant.calibrated_quantize` (quant/calibrate.py;
quantized outputs propagated, AWQ grid 20 with the clip search, GPTQ damping 0.01) on calibration tokens: by default
held-out tokens of the model's own corpus that the evaluation does not score (`split_calibration`). A group size that
does not divide an axis uses its largest divisor below 128, as `eval_recipes.fitted_rules` does for RTN.

The FP4 rows share one scale rule (`quant.formats.fpx`: an e4m3 scale per block of 32, an fp32 scale per tensor;
4.25 bits per weight plus 64 bits per tensor) and differ only in the element grid: `e2m1_g32` is e2m1 with absmax
scaling, the searched ones pick per layer one of e1m2 / e2m1 / e3m0 and a clipping ratio 1.0 … 0.55 (plain e2m1
is one of the candidates; `fp4_search_noclip_g32` keeps the ratio at 1).
"""

from __future__ import annotations

import numpy as np

from cce_jax.quant import recipes as recipes_lib
from cce_jax.quant.calibrate import calibrated_quantize
from cce_jax.quant.formats import get_format

_TABLE = {}
for _bits in (4, 3):
  _fmt = f"int{_bits}"
  _TABLE[f"rtn_w{_bits}_g128"] = ("rtn", _fmt, 128, {})
  _TABLE[f"gptq_w{_bits}_g128"] = ("gptq", _fmt, 128, {})
  _TABLE[f"gptq_w{_bits}_g128_act"] = ("gptq", _fmt, 128, {"act_order": True})
  _TABLE[f"awq_w{_bits}_g128"] = ("awq", _fmt, 128, {})
  _TABLE[f"awq_gptq_w{_bits}_g128"] = ("awq+gptq", _fmt, 128, {})
_TABLE["e2m1_g32"] = ("rtn", "fp4_e2m1", 32, {})
_TABLE["fp4_wsearch_g32"] = ("rtn", "fp4_search", 32, {})
_TABLE["fp4_search_g32"] = ("fp_search", "fp4_search", 32, {})
_TABLE["fp4_search_noclip_g32"] = ("fp_search", get_format("fp4_search", clip=1.0), 32, {})


def names() -> tuple[str, ...]:
  return tuple(_TABLE)


def needs_calibration(name: str) -> bool:
  """True for the recipes of this table that run a calibrated method (all but the round-to-nearest ones)."""
  return name in _TABLE and _TABLE[name][0] != "rtn"


def rules(name: str) -> tuple[recipes_lib.Rule, ...]:
  """The RTN rules with this recipe's format and group size (for size reports and the rtn_* recipes)."""
  _, fmt, group, _ = _TABLE[name]
  return recipes_lib.decoder_rules(fmt, group)


def quantize(model, name: str, calib_tokens, *, seq_len: int | None = None, batch_size: int = 8):
  """The calibrated model of recipe `name` (a `calibrated_quantize` result) from calibration token ids."""
  method, fmt, group, options = _TABLE[name]
  if method == "rtn":
    raise ValueError(f"recipe {name!r} is round to nearest; use its rules")
  return calibrated_quantize(model, calib_tokens, method, fmt, group_size=group, seq_len=seq_len,
                             batch_size=batch_size, **options)


def split_calibration(tokens, eval_tokens: int | None, calib_tokens: int):
  """(evaluation stream, calibration stream) from one held-out stream; the two never share a token.

  With eval_tokens: the first eval_tokens + 1 tokens are scored and the next calib_tokens calibrate. Without: the
  last calib_tokens calibrate and the rest are scored. ValueError when the stream is too short for both.
  """
  tokens = np.asarray(tokens)
  if calib_tokens < 1:
    raise ValueError(f"calib_tokens must be >= 1, got {calib_tokens}")
  if eval_tokens is None:
    if len(tokens) <= calib_tokens + 1:
      raise ValueError(f"{len(tokens)} held-out tokens leave none to score after {calib_tokens} calibration tokens")
    return tokens[:-calib_tokens], tokens[-calib_tokens:]
  calib = tokens[eval_tokens + 1:eval_tokens + 1 + calib_tokens]
  if len(calib) < calib_tokens:
    raise ValueError(f"{len(tokens)} held-out tokens hold {eval_tokens + 1} to score and only {len(calib)} of the "
                     f"{calib_tokens} calibration tokens")
  return tokens[:eval_tokens + 1], calib
