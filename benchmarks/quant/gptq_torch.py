"""A PyTorch GPTQ layer for the comparison benchmark `gptq_vs_torch.py`: the IST-DASLab algorithm (Frantar et al.,
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"; the reference is
github.com/IST-DASLab/gptq, `gptq.py`'s `fasterquant`), transcribed in torch. Benchmark code, not library code:
torch is imported inside the functions, so this module imports where torch is missing.

Layout as in cce_jax: w [K, N] (a Flax kernel, [in, out]; K is the contraction axis), H [K, K] = 2 XᵀX / n.
Inside, the weights are kept as IST keeps a torch Linear's weight, W = wᵀ [N, K], and a "column" is one input.

Steps (IST's `fasterquant`):
1. dead inputs (diag H == 0): H_kk = 1 and W[:, k] = 0;
2. static groups: every group's scale from the (dead-zeroed) W before any update or permutation;
3. act-order: inputs permuted by descending diag H (a stable sort);
4. damping: H += damp · mean(diag H) · I; Cholesky, its inverse (`cholesky_inverse`), the upper Cholesky factor U
   of H⁻¹;
5. lazy blocks of `block_size` columns: inside a block column i is rounded, e = (w_i − ŵ_i) / U_ii and the block's
   columns i.. get W1 −= e U_i,·; after the block, W[:, later] −= E U[block, later] (one matrix product);
6. dynamic groups: a group's scale from W[:, j:j+g] when its first column j is reached (IST reads the lazily
   updated W, not the block copy W1: equal to W1 at j when g is a multiple of block_size, as at g = block = 128).

The rounding rule is cce_jax's integer formats' (quant/formats/int.py), so that codes compare one to one:
symmetric b bits s = amax / divisor (divisor 2^(b−1) − 1 unless given; a zero block gets s = 1),
q = clip(round(w / s), −2^(b−1), 2^(b−1) − 1), stored code q + 2^(b−1); asymmetric: lo = min(min w, 0),
hi = max(max w, 0), s = (hi − lo) / (2^b − 1) (1 if hi == lo), z = round(−lo / s), q = clip(round(w / s) + z, 0,
2^b − 1). `torch.round` rounds half to even, like `jnp.round`. IST's own `Quantizer` is the asymmetric rule
(sym=False) or the symmetric one with divisor 2^(b−1) − 1/2 (sym=True).

Per channel (group_size None), the scales are computed from W before the dead inputs are zeroed, as IST does
(cce_jax: after). A Cholesky failure raises torch's error (IST's behaviour; no damping retries here).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class IntSpec:
  """An integer format: `bits`, `signed` (symmetric, no zero point), `divisor` of the symmetric scale."""
  bits: int
  signed: bool = True
  divisor: float | None = None

  @property
  def qmin(self) -> int:
    return -(2 ** (self.bits - 1)) if self.signed else 0

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1


def scales(w, spec: IntSpec):
  """(scales, zero points) over the last axis of `w` [..., m] float32, each [..., 1] float32 (zeros 0 if signed)."""
  import torch  # pylint: disable=import-outside-toplevel
  if spec.signed:
    a = w.abs().amax(dim=-1, keepdim=True)
    divisor = spec.divisor if spec.divisor is not None else float(spec.qmax)
    s = torch.where(a > 0, a / divisor, torch.ones_like(a))
    return s, torch.zeros_like(s)
  lo = torch.clamp(w.amin(dim=-1, keepdim=True), max=0.0)
  hi = torch.clamp(w.amax(dim=-1, keepdim=True), min=0.0)
  s = torch.where(hi > lo, (hi - lo) / spec.qmax, torch.ones_like(hi))
  return s, torch.clamp(torch.round(-lo / s), 0, spec.qmax)


def round_to_grid(w, s, z, spec: IntSpec):
  """(stored codes as float, dequantized values) of `w` on the grid of scales `s` and zero points `z` (broadcast)."""
  import torch  # pylint: disable=import-outside-toplevel
  if spec.signed:
    q = torch.clamp(torch.round(w / s), spec.qmin, spec.qmax)
    return q - spec.qmin, q * s
  q = torch.clamp(torch.round(w / s) + z, 0, spec.qmax)
  return q, (q - z) * s


def rtn(w, spec: IntSpec, group_size=None):
  """Round-to-nearest of w [K, N] with per-channel (None) or per-group (int g dividing K) scales along K.
  Returns (codes [N, K] uint8, dequantized [K, N] float32)."""
  import torch  # pylint: disable=import-outside-toplevel
  wt = w.T.to(torch.float32)
  n, k = wt.shape
  g = k if group_size is None else group_size
  blocks = wt.reshape(n, k // g, g)
  s, z = scales(blocks, spec)
  codes, deq = round_to_grid(blocks, s, z, spec)
  return codes.reshape(n, k).to(torch.uint8), deq.reshape(n, k).T


def gptq(w, hessian, spec: IntSpec, *, group_size=None, act_order=False, static_groups=False, damp=0.01,
         block_size=128):
  """GPTQ of w [K, N] (torch tensor, any float dtype; computed in float32 on w's device) with H `hessian` [K, K].

  `group_size`: None (per output channel) or an int g dividing K. Returns (codes [N, K] uint8 in the stored form of
  the module docstring, original input order; dequantized weights [K, N] float32).
  """
  import torch  # pylint: disable=import-outside-toplevel
  k, n = w.shape
  if tuple(hessian.shape) != (k, k):
    raise ValueError(f"gptq: hessian has shape {tuple(hessian.shape)}, expected ({k}, {k}) for w of shape {(k, n)}")
  if group_size is not None and k % group_size:
    raise ValueError(f"gptq: group_size={group_size} does not divide the {k} inputs")
  W = w.T.to(torch.float32).clone()  # [N, K]  # pylint: disable=invalid-name
  H = hessian.to(torch.float32).clone()  # pylint: disable=invalid-name
  if group_size is None:
    s_all, z_all = scales(W, spec)  # [N, 1], before the dead inputs are zeroed (IST)
  dead = torch.diag(H) == 0
  H[dead, dead] = 1.0
  W[:, dead] = 0.0
  if group_size is not None and static_groups:
    s_grp, z_grp = scales(W.reshape(n, k // group_size, group_size), spec)  # [N, K/g, 1]
  perm = None
  if act_order:
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    W, H = W[:, perm], H[perm][:, perm]  # pylint: disable=invalid-name
  if group_size is not None and static_groups:  # each permuted column's original group
    cols = (perm if perm is not None else torch.arange(k, device=W.device)) // group_size
    s_cols, z_cols = s_grp[:, cols, 0], z_grp[:, cols, 0]  # [N, K]
  elif group_size is None:
    s_cols, z_cols = s_all.expand(n, k), z_all.expand(n, k)

  idx = torch.arange(k, device=W.device)
  H[idx, idx] += damp * torch.mean(torch.diag(H))
  lower = torch.linalg.cholesky(H)
  u = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)  # U with UᵀU = H⁻¹

  codes = torch.zeros((n, k), dtype=torch.float32, device=W.device)
  deq = torch.zeros_like(W)
  dynamic = group_size is not None and not static_groups
  for i1 in range(0, k, block_size):
    i2 = min(i1 + block_size, k)
    w1 = W[:, i1:i2].clone()
    err1 = torch.zeros_like(w1)
    u1 = u[i1:i2, i1:i2]
    for i in range(i2 - i1):
      j = i1 + i
      if dynamic:
        if j % group_size == 0:
          s, z = scales(W[:, j:j + group_size], spec)
          s, z = s[:, 0], z[:, 0]
      else:
        s, z = s_cols[:, j], z_cols[:, j]
      col = w1[:, i]
      c, q = round_to_grid(col, s, z, spec)
      codes[:, j], deq[:, j] = c, q
      e = (col - q) / u1[i, i]
      w1[:, i:].addr_(e, u1[i, i:], alpha=-1.0)
      err1[:, i] = e
    W[:, i2:] -= err1 @ u[i1:i2, i2:]
  if perm is not None:
    inverse = torch.argsort(perm)
    codes, deq = codes[:, inverse], deq[:, inverse]
  return codes.to(torch.uint8), deq.T
