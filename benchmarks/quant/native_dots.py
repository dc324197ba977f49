r"""Probe: dots against quantized weights, and whether XLA runs fp8 x fp8 / int8 x int8 as native GEMMs.

    python -m benchmarks.quant.native_dots                # on a GPU: [8192, 4096] x [4096, 4096] and x [4096, 14336]
    python -m benchmarks.quant.native_dots --small        # tiny shapes, runs on CPU

Per shape M x K x N (activations x [M, K] bf16, weights w [K, N]) and method, in one process on the same tensors:
`bf16` (x @ w), `deq_<recipe>` (`quant.dot.einsum` on a QArray: dequantized inside the jit, bf16 dot),
`w8a8_<fmt>` (`quant.dot.native_einsum`: x quantized per token, fp8 x fp8 or int8 x int8 dot, rescaled) and
`gemm_<fmt>` (the 8-bit dot alone, operands already quantized). Columns: median ms, TFLOP/s (2MKN), the weight's
bytes, relative error against the fp32 HIGHEST-precision product, and what the compiled HLO multiplies with: the
GEMM's custom-call target or fusion kind and whether its operands are f8e4m3fn / s8 ("8-bit gemm").
"""

from __future__ import annotations

import json
import math
import re

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from cce_jax import quant
from cce_jax.ops.linear_cross_entropy.timing import median_ms
from cce_jax.quant import dot

_SHAPES = flags.DEFINE_list("shapes", ["8192x4096x4096", "8192x4096x14336"], "M x K x N shapes.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny shapes (CPU): 64x128x128 and 64x128x256.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs per method.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the rows.")

DEQ_RECIPES = {"int8": ("int8", None), "int4_g128": ("int4", 128), "fp8": ("fp8_e4m3", None)}
NATIVE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
_GEMM_LINE = re.compile(r'custom_call_target="([^"]*(?:gemm|matmul)[^"]*)"|"kind":"(__triton_gemm)"|\s(dot)\(')
_CALL = re.compile(r"\s(?:custom-call|fusion|dot)\(([^)]*)\)")  # the operand list
_DEF = re.compile(r"%([\w.\-]+) = \(?([a-z0-9]+)\[")


def _nbytes(tree) -> int:
  return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def gemm_lowering(fn, *args) -> tuple[str, bool, list[str]]:
  """(GEMM kinds in the compiled HLO, whether one of them has f8e4m3fn or s8 operands, the GEMM lines)."""
  lines = jax.jit(fn).lower(*args).compile().as_text().splitlines()
  element_type = dict(m.groups() for m in map(_DEF.search, lines) if m)  # instruction name -> element type
  kinds, eight_bit, found = set(), False, []
  for line in lines:
    m = _GEMM_LINE.search(line)
    if m and " = " in line:
      kinds.add(next(g for g in m.groups() if g))
      found.append(line.strip()[:400])
      call = _CALL.search(line)
      operands = re.findall(r"%([\w.\-]+)", call.group(1)) if call else []
      eight_bit |= any(element_type.get(o) in ("f8e4m3fn", "s8") for o in operands)
  return ",".join(sorted(kinds)) or "-", eight_bit, found


def methods(x, w):
  """{name: (fn, args, weight bytes)} for activations x [M, K] bf16 and weights w [K, N] fp32."""
  out = {"bf16": (lambda x, w: x @ w, (x, w.astype(jnp.bfloat16)), _nbytes(w) // 2)}
  for name, (fmt, group) in DEQ_RECIPES.items():
    q = quant.quantize(w, fmt, axis=0, group_size=group)
    out[f"deq_{name}"] = (lambda x, q: dot.einsum("mk,kn->mn", x, q, dtype=jnp.bfloat16), (x, q), _nbytes(q))
  for name, dtype in NATIVE.items():
    q = quant.quantize(w, DEQ_RECIPES[name][0], axis=0)
    out[f"w8a8_{name}"] = (lambda x, q: dot.native_einsum("mk,kn->mn", x, q).astype(jnp.bfloat16), (x, q),
                           _nbytes(q))
    xq = dot._signed(q.fmt.encode(x.astype(jnp.float32), (1,)).codes, q.fmt)  # pylint: disable=protected-access
    wq = dot._signed(q.values, q.fmt)  # [N, K]: the contraction axis minor, as the GEMM wants it
    acc = jnp.int32 if dtype == jnp.int8 else jnp.float32
    out[f"gemm_{name}"] = (
        lambda a, b, acc=acc: jax.lax.dot_general(a, b, (([1], [1]), ([], [])), preferred_element_type=acc),
        (xq, wq), _nbytes(wq))
  return out


def run_shape(m, k, n, repeats):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (k, n), jnp.float32) / math.sqrt(k)
  ref = jnp.dot(x.astype(jnp.float32), w, precision="highest")
  rows = []
  for name, (fn, args, nbytes) in methods(x, w).items():
    ms = median_ms(jax.jit(fn), args, repeats)
    y = jax.jit(fn)(*args).astype(jnp.float32)
    err = None if name.startswith("gemm_") else float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    kinds, eight_bit, lines = gemm_lowering(fn, *args)
    rows.append({"shape": f"{m}x{k}x{n}", "method": name, "ms": ms, "tflops": 2 * m * k * n / ms / 1e9,
                 "weight_mb": nbytes / 2**20, "rel_err": err, "gemm": kinds, "eight_bit_gemm": eight_bit,
                 "gemm_hlo": lines})
  return rows


def main(argv):
  del argv
  shapes = ["64x128x128", "64x128x256"] if _SMALL.value else _SHAPES.value
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
  print("| shape | method | ms | TFLOP/s | weight MB | rel. err | gemm in HLO | 8-bit gemm |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for shape in shapes:
    m, k, n = (int(s) for s in shape.lower().split("x"))
    for r in run_shape(m, k, n, _REPEATS.value):
      rows.append(r)
      err = "-" if r["rel_err"] is None else f"{r['rel_err']:.2e}"
      print(f"| {r['shape']} | {r['method']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['weight_mb']:.2f} | {err} | "
            f"{r['gemm']} | {'yes' if r['eight_bit_gemm'] else 'no'} |", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"device": dev.device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
