"""Loss-curve laws over learning-rate schedules: LR annealing (Tissue et al. 2024) and multi-power (Luo et al. 2025).

Both predict the loss at step s of a run from its whole LR schedule η_1, …, η_T (η_s is the LR of update s; the loss
at step s is measured after updates 1..s). A law is built for fixed schedules, held as constants, and its covariates
are (curve index, step): x [N, 2] = (c, s) with c in [0, curves) and s in [1, T_c], both integers stored as floats.

With S1(s) = Σ_{τ≤s} η_τ (the area, warmup included), η_0 = 0 and the drops d_j = η_{j−1} − η_j counted for
j > W (`warmup_steps`):

  LR annealing:  L(s) = L0 + A S1(s)^−α − C S2(s),   S2(s) = Σ_{i≤s} m_i,  m_i = λ m_{i−1} + d_i
  multi-power:   L(s) = L0 + A S1(s)^−α − LD(s),    LD(s) = B Σ_{W<j≤s} d_j G(η_j^−γ S_j(s)),
                 G(x) = 1 − (C x + 1)^−β,  S_j(s) = Σ_{τ=j}^{s} η_τ = S1(s) − S1(j−1)

Luo et al. write the power term as A (S1(t) + S_W)^−α with t counted after warmup and S_W the warmup area: that is
S1(s) here. Their paper starts the LD sum after warmup (W = warmup length); their released fits count the warmup's
rise too (W = 0: rising steps are negative drops, worth about −B η_peak once warm), and only with W = 0 do the
published parameters reproduce their R² on their curves, so W = 0 is the default. Tissue et al.'s momentum form uses
a fixed decay λ (0.999 by default, their usual value); pass W = warmup length to keep the warmup's rise out of S2.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from cce_jax.scaling.laws.base import Law

_TINY_LR = 1e-30  # LRs of exactly 0 enter η^−γ; floored so that 0·∞ never happens (G(0) = 0, G(∞) = 1)


@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleLaw(Law):
  """A Law over x [N, 2] = (curve index, step) for fixed schedules. lengths [curves]: T_c, the last valid step."""

  lengths: tuple[int, ...]

  def validate_covariates(self, x) -> None:
    """Raises ValueError unless every curve index is an integer in [0, curves) and every step in [1, T_c]."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 2:
      raise ValueError(f"x must have shape [points, 2] (curve, step), got {x.shape}")
    curve, step = x[:, 0], x[:, 1]
    if (curve != np.round(curve)).any() or (step != np.round(step)).any():
      raise ValueError("curve indices and steps must be integers")
    if (curve < 0).any() or (curve >= len(self.lengths)).any():
      raise ValueError(f"curve indices must be in [0, {len(self.lengths)}), got {curve.min()}..{curve.max()}")
    last = np.asarray(self.lengths)[curve.astype(np.int64)]
    if (step < 1).any() or (step > last).any():
      raise ValueError(f"steps must be in [1, T_c] for their curve (T = {self.lengths})")


def _stack_schedules(schedules, warmup_steps):
  """(lr [C, T] padded with each curve's last LR, lengths [C], warmup [C]) with checks."""
  rows = [np.asarray(s, np.float64) for s in schedules]
  if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
    raise ValueError("schedules must be a non-empty sequence of non-empty 1-D LR arrays (or a [curves, T] array)")
  if any(not np.isfinite(r).all() or (r < 0).any() for r in rows):
    raise ValueError("learning rates must be finite and non-negative")
  if any(r[0] <= 0 for r in rows):
    raise ValueError("the first LR of every schedule must be positive (S1(s)^−α needs a positive area)")
  lengths = np.array([r.size for r in rows])
  lr_CxT = np.stack([np.pad(r, (0, lengths.max() - r.size), mode="edge") for r in rows])
  warmup = np.broadcast_to(np.asarray(warmup_steps), (len(rows),)).astype(np.int64)
  if (warmup < 0).any() or (warmup >= lengths).any():
    raise ValueError(f"warmup_steps must be in [0, T_c) per curve, got {warmup} for lengths {lengths}")
  return lr_CxT, lengths, warmup


def _areas_and_drops(lr_CxT, warmup_C):
  """area [C, T+1] (S1(s) for s = 0..T) and d [C, T+1] (d_j = η_{j−1} − η_j for j > W, else 0; η_0 = 0, d_0 = 0)."""
  area = np.concatenate([np.zeros((lr_CxT.shape[0], 1)), np.cumsum(lr_CxT, axis=1)], axis=1)
  d = np.zeros_like(area)
  d[:, 1:] = np.diff(lr_CxT, axis=1, prepend=0.0) * -1.0
  d[np.arange(area.shape[1])[None, :] <= warmup_C[:, None]] = 0.0
  return area, d


def _momentum_area(d_CxT, decay, block=256):
  """S2 [C, T] = cumsum(m), m_i = decay · m_{i−1} + d_i (m_0 = 0), in float64.

  The recurrence runs blockwise: within a block m = P d + decay^(k+1) m_prev with P[i, j] = decay^(i−j) (j <= i).
  """
  k = np.arange(block)
  powers = np.tril(float(decay) ** np.maximum(k[:, None] - k[None, :], 0))
  carry = float(decay) ** (k + 1)
  m = np.empty_like(d_CxT, dtype=np.float64)
  prev = np.zeros(d_CxT.shape[0])
  for first in range(0, d_CxT.shape[1], block):
    d = d_CxT[:, first:first + block]
    n = d.shape[1]
    m[:, first:first + n] = d @ powers[:n, :n].T + prev[:, None] * carry[None, :n]
    prev = m[:, first + n - 1]
  return np.cumsum(m, axis=1)


def _const(array, theta):
  # Built inside the traced function so the constants take theta's dtype (float64 under the fit's x64 mode).
  return jnp.asarray(array, theta.dtype)


def _index(x_NxK):
  return x_NxK[:, 0].astype(jnp.int32), x_NxK[:, 1].astype(jnp.int32)


def _log_positive(loss):
  # A loss <= 0 is outside the law's range: floored (no NaN in the fit's gradient; the residual is then huge).
  return jnp.log(jnp.maximum(loss, 1e-8))


def lr_annealing_law(schedules, warmup_steps=0, *, decay: float = 0.999, name: str = "lr_annealing") -> ScheduleLaw:
  """L(s) = L0 + A S1(s)^−α − C S2(s) (Tissue et al. 2024) for the given schedules.

  Args:
    schedules: [curves, T] array or a sequence of 1-D arrays (lengths may differ): η_1..η_T per curve, float.
    warmup_steps: W (int, or one per curve): drops at steps j <= W do not enter S2 (W = 0: the warmup's
      rise enters as negative drops).
    decay: λ of the momentum m_i = λ m_{i−1} + (η_{i−1} − η_i), in [0, 1).

  Fit space (L0 = e^l0, A = e^log_a, α, C = e^log_c); published names L0, A, alpha, C (and the fixed lambda).
  The grid suits peak LRs of about 1e-4 to 1e-3 and losses of 2–4 nats (8 starts).
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be in [0, 1), got {decay}")
  lr_CxT, lengths, warmup = _stack_schedules(schedules, warmup_steps)
  area, d = _areas_and_drops(lr_CxT, warmup)
  s2 = _momentum_area(d, decay)

  def log_loss(theta, x_NxK):
    l0, log_a, alpha, log_c = theta[0], theta[1], theta[2], theta[3]
    c, s = _index(x_NxK)
    s1 = _const(area, theta)[c, s]
    s2_s = _const(s2, theta)[c, s]
    return _log_positive(jnp.exp(l0) + jnp.exp(log_a - alpha * jnp.log(s1)) - jnp.exp(log_c) * s2_s)

  def published(theta):
    theta = np.asarray(theta, np.float64)
    return {"L0": float(np.exp(theta[0])), "A": float(np.exp(theta[1])), "alpha": float(theta[2]),
            "C": float(np.exp(theta[3])), "lambda": float(decay)}

  return ScheduleLaw(
      name=name, params=("l0", "log_a", "alpha", "log_c"), covariates=("curve", "step"), log_loss=log_loss,
      published=published, lengths=tuple(int(n) for n in lengths),
      grid={"l0": np.log([2.0, 3.0]), "log_a": np.log([0.5]), "alpha": np.array([0.3, 0.6]),
            "log_c": np.log([0.3, 3.0])})


def _merge_drops(values_CxJ, weights_CxJ, bins, width):
  """Per curve, bin and sign: Σ d over the bin's drops of that sign, and the |d|-weighted mean of `values`."""
  sums, means = [], []
  for sign in (1.0, -1.0):
    w = np.where(np.sign(weights_CxJ) == sign, np.abs(weights_CxJ), 0.0).reshape(-1, bins, width)
    total = w.sum(-1)
    sums.append(sign * total)
    means.append([(w * v.reshape(-1, bins, width)).sum(-1) / np.where(total > 0, total, 1.0) for v in values_CxJ])
  return np.concatenate(sums, 1), [np.concatenate(m, 1) for m in zip(*means)]


def multi_power_law(schedules, warmup_steps=0, *, bin_steps: int = 64, name: str = "multi_power") -> ScheduleLaw:
  """L(s) = L0 + A S1(s)^−α − LD(s) (Luo et al. 2025's multi-power law) for the given schedules.

  Args:
    schedules: [curves, T] array or a sequence of 1-D arrays (lengths may differ): η_1..η_T per curve, float.
    warmup_steps: W (int, or one per curve): the loss-drop sum runs over steps j > W, with η_0 = 0. W = 0 (the
      default) counts the warmup's rise as negative drops (worth about −B η_peak once warm): that is how Luo et
      al.'s released fits were made (with it their published parameters give their R² on their curves; with
      W = warmup they are off by ~B η_peak). The paper's text starts the sum after warmup: pass W for that.
    bin_steps: w. LD sums over every step j <= s. The drops of the bin holding s and of the bin before it (bins
      of w steps) enter exactly; older drops are merged per bin and sign into one drop at the |d|-weighted means
      of S1(j−1) and of log η_j. A bin holding one drop (a step schedule) stays exact; otherwise the error is of
      second order in the bin's width, and G is smooth that far (>= w steps) from s (on Luo et al.'s curves,
      w = 64 is within 1e-5 nats of w = 1). Cost per point: 2w + 2T/w terms instead of T; w = 1 is exact.

  x [N, 2] = (curve, step) -> log L [N]. Fit space (L0 = e^l0, A = e^log_a, α, B = e^log_b, C = e^log_c, β, γ);
  published names L0, A, alpha, B, C, beta, gamma. The grid suits peak LRs of about 1e-4 to 1e-3 and losses of
  2–4 nats (8 starts).
  """
  if not (isinstance(bin_steps, (int, np.integer)) and bin_steps >= 1):
    raise ValueError(f"bin_steps must be a positive integer, got {bin_steps!r}")
  lr_CxT, lengths, warmup = _stack_schedules(schedules, warmup_steps)
  area, d = _areas_and_drops(lr_CxT, warmup)
  width = int(bin_steps)
  bins = -(-lr_CxT.shape[1] // width)
  # Per-step drop arrays over j = 1..bins·w, plus one zero bin so that a 2w window never runs past the end.
  span_j = (bins + 1) * width
  pad = lambda a: np.pad(a, ((0, 0), (0, span_j - a.shape[1])))
  size_j = pad(d[:, 1:])
  log_lr_j = pad(np.log(np.maximum(lr_CxT, _TINY_LR)))
  prev_area_j = pad(area[:, :-1])  # S1(j − 1)
  merged_size, (merged_area, merged_log_lr) = _merge_drops(
      [prev_area_j[:, :bins * width], log_lr_j[:, :bins * width]], size_j[:, :bins * width], bins, width)
  merged_bin = np.tile(np.arange(bins), 2)

  def log_loss(theta, x_NxK):
    l0, log_a, alpha, log_b, log_c, beta, gamma = (theta[i] for i in range(7))
    c, s = _index(x_NxK)
    s1 = _const(area, theta)[c, s]

    def drops(size, prev_area, log_lr, include):  # Σ d G(C η^−γ S_j(s)) over the included drops, per point
      span = jnp.maximum(s1[:, None] - prev_area, 0.0)  # clamped where excluded, so no NaN reaches the gradient
      g = -jnp.expm1(-beta * jnp.log1p(jnp.exp(log_c - gamma * log_lr) * span))  # 1 − (1 + C η^−γ S)^−β
      return jnp.sum(jnp.where(include, size * g, 0.0), axis=1)

    bin_s = (s - 1) // width
    first = jnp.maximum(bin_s - 1, 0) * width  # 0-based j − 1 of the window's first step
    window = first[:, None] + jnp.arange(2 * width)[None, :]
    exact = drops(*(_const(a, theta)[c[:, None], window] for a in (size_j, prev_area_j, log_lr_j)),
                  window < s[:, None])
    older = drops(*(_const(a, theta)[c] for a in (merged_size, merged_area, merged_log_lr)),
                  jnp.asarray(merged_bin)[None, :] < (bin_s - 1)[:, None])
    ld = jnp.exp(log_b) * (exact + older)
    return _log_positive(jnp.exp(l0) + jnp.exp(log_a - alpha * jnp.log(s1)) - ld)

  def published(theta):
    theta = np.asarray(theta, np.float64)
    return {"L0": float(np.exp(theta[0])), "A": float(np.exp(theta[1])), "alpha": float(theta[2]),
            "B": float(np.exp(theta[3])), "C": float(np.exp(theta[4])), "beta": float(theta[5]),
            "gamma": float(theta[6])}

  return ScheduleLaw(
      name=name, params=("l0", "log_a", "alpha", "log_b", "log_c", "beta", "gamma"), covariates=("curve", "step"),
      log_loss=log_loss, published=published, lengths=tuple(int(n) for n in lengths),
      grid={"l0": np.log([2.0, 3.0]), "log_a": np.log([0.5]), "alpha": np.array([0.3, 0.6]),
            "log_b": np.log([100.0, 1000.0]), "log_c": np.log([2.0]), "beta": np.array([0.6]),
            "gamma": np.array([0.6])})


def multi_power_theta(params: dict) -> np.ndarray:
  """Fit-space theta [7] from published multi-power parameters {L0, A, alpha, B, C, beta, gamma}."""
  missing = [k for k in ("L0", "A", "alpha", "B", "C", "beta", "gamma") if k not in params]
  if missing:
    raise ValueError(f"missing multi-power parameters {missing}")
  return np.array([np.log(params["L0"]), np.log(params["A"]), params["alpha"], np.log(params["B"]),
                   np.log(params["C"]), params["beta"], params["gamma"]], np.float64)
