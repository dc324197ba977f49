"""The decoder's building blocks (Flax NNX). Activations are [B, T, ...]; names carry their shapes.

Every parameter is read through `cce_jax.quant.dot` (`read` / `einsum`), so a Param may hold a plain array or a
`QArray` (dequantized on the fly, or a native W8A8 dot when the Param is marked so; `quant.quantize_model`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cce_jax.models.config import Config
from cce_jax.quant import dot


def _normal(std):
  return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
  """x / rms(x) · scale, computed in fp32, returned in the compute dtype."""

  def __init__(self, cfg: Config):
    self.eps = cfg.norm_eps
    self.dtype = cfg.compute_dtype
    self.scale = nnx.Param(jnp.ones((cfg.D,), cfg.params_dtype))

  def __call__(self, x_BxTxD):
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * dot.read(self.scale, jnp.float32)).astype(self.dtype)


def rope(x_BxTxHxK, positions_BxT, theta):
  """Rotary position embedding (rotate-half form), in fp32."""
  k = x_BxTxHxK.shape[-1]
  inv_freq_K2 = 1.0 / theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  angles_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_K2
  sin, cos = jnp.sin(angles_BxTxK2)[:, :, None, :], jnp.cos(angles_BxTxK2)[:, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., : k // 2], x[..., k // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE; softmax in fp32 (jax.nn.dot_product_attention)."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    k, std = cfg.head_dim, cfg.init_std
    out_std = std / math.sqrt(2 * cfg.L)
    pd = cfg.params_dtype
    self.wq = nnx.Param(_normal(std)(rngs.params(), (cfg.D, cfg.H, k), pd))
    self.wk = nnx.Param(_normal(std)(rngs.params(), (cfg.D, cfg.KV, k), pd))
    self.wv = nnx.Param(_normal(std)(rngs.params(), (cfg.D, cfg.KV, k), pd))
    self.wo = nnx.Param(_normal(out_std)(rngs.params(), (cfg.H, k, cfg.D), pd))

  def __call__(self, x_BxTxD, positions_BxT):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q_BxTxHxK = dot.einsum("btd,dhk->bthk", x_BxTxD, self.wq, dtype=dt)
    k_BxTxGxK = dot.einsum("btd,dgk->btgk", x_BxTxD, self.wk, dtype=dt)
    v_BxTxGxK = dot.einsum("btd,dgk->btgk", x_BxTxD, self.wv, dtype=dt)
    q_BxTxHxK = rope(q_BxTxHxK, positions_BxT, cfg.rope_theta)
    k_BxTxGxK = rope(k_BxTxGxK, positions_BxT, cfg.rope_theta)
    o_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, is_causal=True)
    return dot.einsum("bthk,hkd->btd", o_BxTxHxK, self.wo, dtype=dt)


class MLP(nnx.Module):
  """SwiGLU: (silu(x W1) * x W3) W2."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.dtype = cfg.compute_dtype
    pd, std = cfg.params_dtype, cfg.init_std
    self.w1 = nnx.Param(_normal(std)(rngs.params(), (cfg.D, cfg.F), pd))
    self.w3 = nnx.Param(_normal(std)(rngs.params(), (cfg.D, cfg.F), pd))
    self.w2 = nnx.Param(_normal(std / math.sqrt(2 * cfg.L))(rngs.params(), (cfg.F, cfg.D), pd))

  def __call__(self, x_BxTxD):
    dt = self.dtype
    gate_BxTxF = dot.einsum("btd,df->btf", x_BxTxD, self.w1, dtype=dt)
    h_BxTxF = jax.nn.silu(gate_BxTxF) * dot.einsum("btd,df->btf", x_BxTxD, self.w3, dtype=dt)
    return dot.einsum("btf,fd->btd", h_BxTxF, self.w2, dtype=dt)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxTxD, positions_BxT):
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), positions_BxT)
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
