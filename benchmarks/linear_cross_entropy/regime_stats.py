"""Statistics of the benchmark's input regimes: how broad the softmax is, and so what gradient filtering can skip.

    python -m benchmarks.linear_cross_entropy.regime_stats --shapes=gemma2_2b,qwen_small --tokens=512

For each shape and synthetic regime (random, peaked, and lm_like at --lm_like_entropy, calibrated on its first
lm_like.CALIBRATION_ROWS tokens) it draws `--tokens` tokens as the benchmark draws them (bf16 inputs), forms the fp32 (softcapped) logits
and prints, as a markdown table: the mean loss and entropy (nats), the share of softmax entries >= 2^-12 (the
default filter threshold), the share of [32-token x 128-entry] tiles that hold such an entry or a target (the tiles
a filtered backward recomputes, in vocabulary-id order) and the share of the probability mass in entries below the
threshold (what filtering drops from the gradient).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.linear_cross_entropy import inputs
from benchmarks.linear_cross_entropy import lm_like

THRESHOLD = 2.0 ** -12
TILE_N, TILE_V = 32, 128


def regime_stats(e_NxD, c_VxD, targets_N, softcap=None) -> dict[str, float]:
  """The regime's statistics (see the module docstring) from fp32 logits of the given inputs."""
  logits_NxV = jnp.dot(e_NxD, c_VxD.T, preferred_element_type=jnp.float32)
  if softcap:
    logits_NxV = softcap * jnp.tanh(logits_NxV / softcap)
  logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
  p_NxV = jnp.exp(logp_NxV)
  n, v = p_NxV.shape
  big_NxV = p_NxV >= THRESHOLD
  big_NxV = big_NxV.at[jnp.arange(n), targets_N].set(True)
  pad_n, pad_v = -n % TILE_N, -v % TILE_V
  tiles = jnp.pad(big_NxV, ((0, pad_n), (0, pad_v))).reshape(
      (n + pad_n) // TILE_N, TILE_N, (v + pad_v) // TILE_V, TILE_V).any(axis=(1, 3))
  return {
      "loss": float(-jnp.mean(logp_NxV[jnp.arange(n), targets_N])),
      "entropy": float(-jnp.mean(jnp.sum(p_NxV * logp_NxV, axis=-1))),
      "entries_kept": float(jnp.mean(p_NxV >= THRESHOLD)),
      "tiles_kept": float(jnp.mean(tiles)),
      "mass_below": float(jnp.mean(jnp.sum(jnp.where(p_NxV < THRESHOLD, p_NxV, 0.0), axis=-1))),
  }


TABLE_HEADER = ("| shape | regime | loss (nats) | entropy (nats) | entries ≥ 2⁻¹² | [32 × 128] tiles with one or a target"
                " | mass < 2⁻¹² |\n|---|---|---|---|---|---|---|")


def table_line(shape, regime, s):
  """One markdown line of TABLE_HEADER's table from regime_stats' dict `s`."""
  return (f"| {shape} | {regime} | {s['loss']:.2f} | {s['entropy']:.2f} | {100 * s['entries_kept']:.4f}% |"
          f" {100 * s['tiles_kept']:.1f}% | {100 * s['mass_below']:.1f}% |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="gemma2_2b,llama3_8b_4k,qwen_small")
  parser.add_argument("--regimes", default="peaked,random,lm_like")
  parser.add_argument("--lm_like_entropy", type=float, default=lm_like.DEFAULT_ENTROPY,
                      help="mean entropy (nats) of the lm_like regime")
  parser.add_argument("--tokens", type=int, default=512)
  args = parser.parse_args(argv)
  for regime in args.regimes.split(","):
    if regime not in inputs.REGIMES:
      parser.error(f"unknown regime {regime!r}; known: {', '.join(inputs.REGIMES)}")
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.tokens} tokens, bf16 inputs")
  print(TABLE_HEADER)
  for shape in args.shapes.split(","):
    if shape not in inputs.SHAPES:
      parser.error(f"unknown shape {shape!r}; known: {', '.join(inputs.SHAPES)}")
    _, d, v, softcap = inputs.SHAPES[shape]
    for regime in args.regimes.split(","):
      entropy = args.lm_like_entropy if regime == "lm_like" else None
      e, c, targets = inputs.make_inputs(args.tokens, d, v, jnp.bfloat16, regime, entropy=entropy, softcap=softcap)
      print(table_line(shape, regime, regime_stats(e, c, targets, softcap)), flush=True)


if __name__ == "__main__":
  main()
