"""The decoder's one config dataclass (math-letter fields, as in nanodo)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
  """A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

  Attributes:
    V: vocabulary size.
    D: model width.
    H: attention heads; D % H == 0 and the head size D // H is even (RoPE rotates pairs).
    KV: key/value heads (grouped-query attention); H % KV == 0. KV == H is multi-head attention.
    L: transformer blocks.
    F: hidden width of the SwiGLU MLP.
    T: longest sequence (positions for RoPE are 0..T-1).
    dtype: compute dtype of activations and matmuls ("bfloat16" default); the loss is always fp32.
    param_dtype: dtype the parameters are stored in ("float32").
    tie_embeddings: use the token embedding [V, D] as the classifier too.
    remat: rematerialise each block in the backward (less memory, one more forward of the blocks).
    rope_theta: RoPE base.
    norm_eps: RMSNorm epsilon.
    init_std: std of the normal initialisers; residual output projections use init_std / sqrt(2 L).
  """

  V: int = 8192
  D: int = 256
  H: int = 4
  KV: int = 4
  L: int = 4
  F: int = 768
  T: int = 256
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  tie_embeddings: bool = False
  remat: bool = False
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02

  def __post_init__(self):
    for name in ("V", "D", "H", "KV", "L", "F", "T"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
    if self.D % self.H:
      raise ValueError(f"Config.D={self.D} must be a multiple of H={self.H}")
    if (self.D // self.H) % 2:
      raise ValueError(f"the head size D // H = {self.D // self.H} must be even (RoPE)")
    if self.H % self.KV:
      raise ValueError(f"Config.H={self.H} must be a multiple of KV={self.KV}")
    for name in ("dtype", "param_dtype"):
      dt = jnp.dtype(getattr(self, name))
      if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"Config.{name} must be a float dtype, got {getattr(self, name)!r}")

  @property
  def head_dim(self) -> int:
    return self.D // self.H

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)
