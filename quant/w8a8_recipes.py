"""W8A8 recipes for `experiments/quantize.py --recipes=...`: 8-bit weights and 8-bit dynamic activations.

| name | weights (per output channel) | activations (dynamic) | smoothing |
|---|---|---|---|
| `w8a8_int8` | int8 | int8, one scale per tensor | none |
| `w8a8_int8_token` | int8 | int8, one scale per token | none |
| `smoothquant_w8a8` | int8 | int8, one scale per token | SmoothQuant, α = 0.5 |
| `smoothquant_w8a8_tensor` | int8 | int8, one scale per tensor | SmoothQuant, α = 0.5 |
| `w8a8_fp8` | fp8_e4m3 | fp8_e4m3, one scale per token | none |

Every kernel of the decoder blocks (wq, wk, wv, wo, w1, w3, w2) is quantized round-to-nearest in the layout of the
RTN recipes `int8` / `fp8_e4m3` (`recipes.decoder_rules(fmt)`), and every dot against one quantizes its input
activations first; the embedding, the RMSNorm scales and the head stay in full precision. A "tensor" scale is the
max |x| of the whole activation tensor of one forward pass (the batch of windows: SmoothQuant's per-tensor dynamic
mode, so it depends on the evaluation batch), a "token" scale that of one token's row.

The activations are fake-quantized (`quantize_model(..., act_quant=...)`: quantized and dequantized, then a float
matmul) unless `native_dots=True`, where the per-token recipes run real int8 × int8 (int32 accumulation) or
fp8 × fp8 dots (`quantize_model(..., native_dots=True)`, `dot.native_einsum`); the per-tensor ones stay
fake-quantized. Both give the same numbers up to float rounding.

SmoothQuant recipes need calibration tokens: `quant.calibration_stats` gives each block input's per-channel max |x|
on the full-precision model, and `quant.smoothquant` folds the migration scales into attn_norm (q/k/v), mlp_norm
(gate/up) and w3 (down) before quantizing. `compare` evaluates the recipes like `eval_recipes.compare` and returns
rows with the same fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flax import nnx

from cce_jax.quant import apply
from cce_jax.quant import eval_recipes
from cce_jax.quant import params as params_lib
from cce_jax.quant import recipes as recipes_lib
from cce_jax.quant.calibrate import calibration_stats
from cce_jax.quant.evaluate import baseline as make_baseline
from cce_jax.quant.evaluate import evaluate
from cce_jax.quant.smoothquant import smoothquant

BASELINE = eval_recipes.BASELINE
ALPHA = 0.5

_TABLE = {  # name: (format, activation granularity, SmoothQuant alpha or None)
    "w8a8_int8": ("int8", "tensor", None),
    "w8a8_int8_token": ("int8", "token", None),
    "smoothquant_w8a8": ("int8", "token", ALPHA),
    "smoothquant_w8a8_tensor": ("int8", "tensor", ALPHA),
    "w8a8_fp8": ("fp8_e4m3", "token", None),
}


def names() -> tuple[str, ...]:
  return tuple(_TABLE)


def needs_calibration(name: str) -> bool:
  """True for the SmoothQuant recipes (they need per-channel activation maxima)."""
  return name in _TABLE and _TABLE[name][2] is not None


def describe(name: str, *, native_dots: bool = False) -> str:
  """One line: weights, activations, smoothing, and whether the dots are native or fake-quantized."""
  fmt, act, alpha = _TABLE[name]
  native = native_dots and act == "token"
  return (f"{fmt} weights per channel, {fmt} activations per {act} (dynamic)"
          + (f", SmoothQuant alpha {alpha}" if alpha is not None else "")
          + (", native 8-bit dots" if native else ", fake-quantized dots"))


def quantize(model, name: str, *, stats=None, native_dots: bool = False):
  """The W8A8 model of recipe `name`: a `quantize_model` copy of `model` (smoothed first for SmoothQuant).

  stats: `quant.calibration_stats(model, calib_tokens)` of the full-precision model (SmoothQuant recipes only).
  native_dots: real 8-bit dots for the per-token recipes (module docstring).
  """
  if name not in _TABLE:
    raise ValueError(f"unknown W8A8 recipe {name!r}; known: {', '.join(_TABLE)}")
  fmt, act, alpha = _TABLE[name]
  if alpha is not None:
    if stats is None:
      raise ValueError(f"recipe {name!r} needs calibration statistics (quant.calibration_stats)")
    model = smoothquant(model, stats, alpha=alpha)
  rules = recipes_lib.decoder_rules(fmt)
  if native_dots and act == "token":
    return apply.quantize_model(model, rules, native_dots=True)
  return apply.quantize_model(model, rules, act_quant=(fmt, act))


def compare(model, tokens, recipe_names, *, seq_len: int | None = None, batch_size: int = 8,
            chunk_tokens: int = 256, calib_tokens=None, native_dots: bool = False,
            on_row: Callable[[int, int, dict], None] | None = None,
            on_batch: Callable[[str, dict], None] | None = None) -> list[dict]:
  """Rows for the full-precision baseline and each W8A8 recipe, in `eval_recipes.compare`'s fields.

  tokens: the scored ids (1-D stream or [N, T + 1] windows); calib_tokens: ids for the SmoothQuant statistics
  (required when a SmoothQuant recipe is named; calibrated once, in windows of seq_len). Rows' seconds include
  quantizing (and smoothing; the statistics' time goes to the first SmoothQuant row) and evaluating.
  """
  recipe_names = list(recipe_names)
  unknown = [n for n in recipe_names if n not in _TABLE]
  if unknown or not recipe_names:
    raise ValueError(f"unknown W8A8 recipe {(unknown or [''])[0]!r}; known: {', '.join(_TABLE)}")
  if any(needs_calibration(n) for n in recipe_names) and calib_tokens is None:
    raise ValueError("the SmoothQuant recipes need calibration tokens")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  base = make_baseline(model, tokens, seq_len=seq_len, batch_size=batch_size)
  rows = [eval_recipes.baseline_row(params, base)]
  if on_row:
    on_row(0, len(recipe_names), rows[0])
  stats = None
  for i, name in enumerate(recipe_names, 1):
    t0 = time.perf_counter()
    if needs_calibration(name) and stats is None:
      stats = calibration_stats(model, calib_tokens, seq_len=base.windows.shape[1] - 1, batch_size=batch_size)
    qmodel = quantize(model, name, stats=stats, native_dots=native_dots)
    report = params_lib.size_report(params, nnx.to_pure_dict(nnx.state(qmodel, nnx.Param)))
    res = evaluate(base, qmodel, base.windows, chunk_tokens=chunk_tokens,
                   progress=None if on_batch is None else (lambda p, name=name: on_batch(name, p)))
    rows.append(eval_recipes.recipe_row(name, res, report, time.perf_counter() - t0,
                                        [describe(name, native_dots=native_dots)]))
    if on_row:
      on_row(i, len(recipe_names), rows[-1])
  return rows
