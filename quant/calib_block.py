"""One decoder `Block` (models/layers.py) run piece by piece, returning the inputs of each of its linear layers.

`block_pieces(block, x, positions) -> (out, inputs)` computes exactly `block(x, positions)` (the same `dot.einsum`
calls in the same compute dtype, read from the block's own Params) and also returns the activations that feed its
kernels, flattened to [B, T, in]:

- "qkv": attn_norm(x) [B, T, D], the input of wq, wk, wv;
- "o": the attention output before wo [B, T, H·K] (heads then head_dim: wo [H, K, D] reshaped to [H·K, D]);
- "up": mlp_norm(x + attn) [B, T, D], the input of w1 and w3;
- "down": the SwiGLU hidden silu(m w1) · (m w3) [B, T, F], the input of w2.

Read-only use of the model code: the attention and MLP bodies are transcribed here (tests check the output equals
`block(x, positions)`), so models/ needs no capture hook.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from cce_jax.quant import dot

INPUTS = ("qkv", "o", "up", "down")
"""The linear-layer inputs of a block, in the order they are computed."""

KERNELS = {"qkv": ("attn/wq", "attn/wk", "attn/wv"), "o": ("attn/wo",), "up": ("mlp/w1", "mlp/w3"),
           "down": ("mlp/w2",)}
"""Which kernels (paths inside a block) each input feeds."""


def block_pieces(block, x_BxTxD, positions_BxT):
  """(block output [B, T, D], {input name: [B, T, in]}) for a `cce_jax.models.layers.Block` (module docstring)."""
  # Imported here: models/layers.py imports cce_jax.quant (dot), which imports this module.
  from cce_jax.models.layers import rope  # pylint: disable=import-outside-toplevel

  attn, mlp = block.attn, block.mlp
  cfg, dt = attn.cfg, attn.cfg.compute_dtype
  a_BxTxD = block.attn_norm(x_BxTxD)
  q_BxTxHxK = rope(dot.einsum("btd,dhk->bthk", a_BxTxD, attn.wq, dtype=dt), positions_BxT, cfg.rope_theta)
  k_BxTxGxK = rope(dot.einsum("btd,dgk->btgk", a_BxTxD, attn.wk, dtype=dt), positions_BxT, cfg.rope_theta)
  v_BxTxGxK = dot.einsum("btd,dgk->btgk", a_BxTxD, attn.wv, dtype=dt)
  o_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, is_causal=True)
  x_BxTxD = x_BxTxD + dot.einsum("bthk,hkd->btd", o_BxTxHxK, attn.wo, dtype=dt)
  m_BxTxD = block.mlp_norm(x_BxTxD)
  gate_BxTxF = dot.einsum("btd,df->btf", m_BxTxD, mlp.w1, dtype=mlp.dtype)
  h_BxTxF = jax.nn.silu(gate_BxTxF) * dot.einsum("btd,df->btf", m_BxTxD, mlp.w3, dtype=mlp.dtype)
  out_BxTxD = x_BxTxD + dot.einsum("btf,fd->btd", h_BxTxF, mlp.w2, dtype=mlp.dtype)
  b, t = x_BxTxD.shape[:2]
  return out_BxTxD, {"qkv": a_BxTxD, "o": o_BxTxHxK.reshape(b, t, -1), "up": m_BxTxD, "down": h_BxTxF}


@functools.partial(jax.jit, static_argnums=0)
def _pieces(graphdef, state, x_BxTxD, positions_BxT):
  return block_pieces(nnx.merge(graphdef, state), x_BxTxD, positions_BxT)


def jitted_pieces(block, x_BxTxD, positions_BxT):
  """`block_pieces` as one jitted computation (compiled once per block structure and shape)."""
  graphdef, state = nnx.split(block)
  return _pieces(graphdef, state, x_BxTxD, positions_BxT)
