"""The `lm_like` input regime: hidden states, classifier and targets with a trained language model's statistics, at
any shape, drawn on the device from a seed.

The logit of token v in row i is, before a common scale s,
    z[i, v] = log f[v]  +  TOPIC_LOGIT·[v in context(i)]  +  pull·[v = target(i)]  +  noise (std ~NOISE),
each term a part of the dot product e[i] · c[v]:
- frequency prior: f is a Zipf-Mandelbrot unigram law (f ∝ (rank + ZIPF_OFFSET)^-ZIPF_EXPONENT) whose ranks sit on a
  random permutation of the ids, as frequent tokens do in BPE vocabularies; coordinate 0 of c holds
  PRIOR_NORM · log f (centred), coordinate 0 of e holds 1 / PRIOR_NORM.
- context: each token belongs to one of TOPICS random topics (at least 16 tokens each), a random unit direction;
  c[v] holds TOPIC_NORM times its topic's direction, e[i] TOPIC_LOGIT / TOPIC_NORM times its context's. A row's mass
  goes to its context's tokens, weighted by frequency, so rows differ in their large entries (frequency order alone
  does not gather them).
- targets: drawn from f; a row's context is its target's topic, except for a share SURPRISE of rows that get a
  random one (tokens a model does not see coming); e[i] holds pull · c[t] / |c[t]|² (the target's row of c).
- noise: c ~ N(0, 1/D) and e ~ N(0, NOISE²) in the other coordinates; each row is also scaled by
  exp(N(0, ROW_SPREAD²)), so that confident and uncertain positions mix as they do in text.
s and the pull are set by bisection on the first CALIBRATION_ROWS rows: s puts the mean entropy of their
(softcapped) softmax at the requested one, the pull puts their mean loss at LOSS_PER_ENTROPY times it (the target
tends to be among the likely tokens). With the default entropy, at V 152k–262k and D 1024–2304: loss 2.7–2.8 nats,
~190–240 entries ≥ 2⁻¹² per row (0.07–0.13%); at V 128k the same count is 0.15%.

Memory: c in the output dtype [V, D] (drawn in blocks of _BLOCK_ROWS rows), e and its pull in fp32 [N, D], and a
few fp32 [CALIBRATION_ROWS, V] arrays; never an N × V array.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

ZIPF_EXPONENT = 1.05
ZIPF_OFFSET = 2.7
TOPICS = 512  # or fewer, so that each has at least 16 tokens
TOPIC_LOGIT = 8.0  # logit boost of the context's topic, before the scale
SURPRISE = 0.1  # share of rows whose context is not their target's topic
NOISE = 2.0  # std of the unstructured part of the logits, before the scale
ROW_SPREAD = 0.25  # std of the rows' log-scale
PRIOR_NORM = 0.1  # c's frequency coordinate is PRIOR_NORM · log f
TOPIC_NORM = 0.5  # norm of the topic part of c's rows
DEFAULT_ENTROPY = 4.5  # nats
LOSS_PER_ENTROPY = 0.6  # the pull puts the mean loss at this fraction of the mean entropy
CALIBRATION_ROWS = 256
_BLOCK_ROWS = 8192  # rows of c drawn at a time
_SCALE_STEPS = (10, 18)  # bisection steps of the scale, while searching the pull and at the end
_PULL_STEPS = 8
_MAX_PULL = 16.0
_LOG2_SCALE_RANGE = 6.0  # the scale is searched in [2^-6, 2^6]
_ENTROPY_TOLERANCE = 0.05  # nats; a requested entropy the scale cannot reach within this is refused


def check_entropy(entropy, v):
  """Raises a one-line ValueError unless 0 < entropy < log V (nats)."""
  if not 0 < entropy < math.log(v):
    raise ValueError(f"entropy={entropy} must lie in (0, log V = {math.log(v):.2f}) nats")


def vocabulary(v, seed=0):
  """(log f [V] fp32, normalised, indexed by token id; topic [V] int32): make_lm_like's unigram law and topics."""
  k_perm, k_topic, *_ = _keys(seed)
  return _vocabulary(k_perm, k_topic, v)


def _keys(seed):
  """Keys of the id permutation, token topics, topic directions, classifier and hidden states."""
  return jax.random.split(jax.random.key(seed), 5)


def _topics(v):
  return max(1, min(TOPICS, v // 16))


@functools.partial(jax.jit, static_argnums=(2,))
def _vocabulary(k_perm, k_topic, v):
  log_f_rank = -ZIPF_EXPONENT * jnp.log(jnp.arange(1, v + 1, dtype=jnp.float32) + ZIPF_OFFSET)
  log_f_rank = log_f_rank - jax.nn.logsumexp(log_f_rank)
  id_of_rank = jax.random.permutation(k_perm, v)
  log_f_V = jnp.zeros((v,), jnp.float32).at[id_of_rank].set(log_f_rank)
  topic_V = jax.random.randint(k_topic, (v,), 0, _topics(v), jnp.int32)
  return log_f_V, topic_V


def _topic_directions(key, topics, d):
  """[topics, D] fp32 unit vectors outside coordinate 0 (the frequency coordinate)."""
  dirs = jax.random.normal(key, (topics, d - 1), jnp.float32)
  dirs = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
  return jnp.pad(dirs, ((0, 0), (1, 0)))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _classifier(key, topic_dirs, log_f_V, topic_V, d, dtype):
  """c [V, D] in dtype: N(0, 1/D) noise, the centred log-frequency in coordinate 0, the token's topic direction.
  Drawn in blocks of _BLOCK_ROWS rows, so that no fp32 [V, D] array exists."""
  v = log_f_V.shape[0]
  rows = min(_BLOCK_ROWS, v)
  blocks = -(-v // rows)
  prior_V = PRIOR_NORM * (log_f_V - jnp.mean(log_f_V))
  prior_BxR = jnp.pad(prior_V, (0, blocks * rows - v)).reshape(blocks, rows)
  topic_BxR = jnp.pad(topic_V, (0, blocks * rows - v)).reshape(blocks, rows)

  def block(args):
    i, prior_R, topic_R = args
    noise_RxD = jax.random.normal(jax.random.fold_in(key, i), (rows, d), jnp.float32) / math.sqrt(d)
    c_RxD = jnp.where(jnp.arange(d) == 0, prior_R[:, None], noise_RxD) + TOPIC_NORM * topic_dirs[topic_R]
    return c_RxD.astype(dtype)

  return jax.lax.map(block, (jnp.arange(blocks), prior_BxR, topic_BxR)).reshape(blocks * rows, d)[:v]


@functools.partial(jax.jit, static_argnums=(5,))
def _hidden(key, topic_dirs, log_f_V, topic_V, c_VxD, n):
  """(e [N, D] fp32 without the pull, pull [N, D] fp32, targets [N] int32); the benchmark's e is
  scale · (e + pull_logit · pull). pull raises its target's logit by the row's spread factor (~1)."""
  v, d = c_VxD.shape
  k_target, k_surprise, k_topic, k_noise, k_spread = jax.random.split(key, 5)
  # Targets by inverse CDF over the ranks (never an N × V array), then mapped to ids through the frequency order.
  order_V = jnp.argsort(-log_f_V)
  cdf_V = jnp.cumsum(jnp.exp(log_f_V[order_V]))
  u_N = jax.random.uniform(k_target, (n,), jnp.float32) * cdf_V[-1]
  targets_N = order_V[jnp.minimum(jnp.searchsorted(cdf_V, u_N, side="right"), v - 1)].astype(jnp.int32)
  surprise_N = jax.random.uniform(k_surprise, (n,)) < SURPRISE
  context_N = jnp.where(surprise_N, jax.random.randint(k_topic, (n,), 0, topic_dirs.shape[0]), topic_V[targets_N])
  noise_NxD = NOISE * jax.random.normal(k_noise, (n, d), jnp.float32)
  e_NxD = jnp.where(jnp.arange(d) == 0, 1.0 / PRIOR_NORM, noise_NxD)
  e_NxD = e_NxD + (TOPIC_LOGIT / TOPIC_NORM) * topic_dirs[context_N]
  rows_NxD = c_VxD[targets_N].astype(jnp.float32)
  pull_NxD = rows_NxD / jnp.sum(rows_NxD * rows_NxD, axis=1, keepdims=True)
  spread_Nx1 = jnp.exp(ROW_SPREAD * jax.random.normal(k_spread, (n, 1), jnp.float32))
  return e_NxD * spread_Nx1, pull_NxD * spread_Nx1, targets_N


def _bisect(f, lo, hi, steps):
  """The root of f, a decreasing function of one fp32 scalar, in [lo, hi], by `steps` halvings."""

  def step(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) / 2
    above = f(mid) > 0
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, steps, step, (jnp.float32(lo), jnp.float32(hi)))
  return (lo + hi) / 2


@functools.partial(jax.jit, static_argnums=(5,))
def _calibrate(e_RxD, pull_RxD, targets_R, c_VxD, entropy, softcap):
  """(scale, pull, mean entropy, mean loss): the pull that puts the loss at LOSS_PER_ENTROPY · entropy, each pull
  with the scale that puts the mean entropy at `entropy` (both fall as their parameter grows)."""
  dot = lambda x_RxD: jnp.dot(x_RxD.astype(c_VxD.dtype), c_VxD.T, preferred_element_type=jnp.float32)
  base_RxV, pull_RxV = dot(e_RxD), dot(pull_RxD)

  def stats(log2_scale, pull):
    logits_RxV = 2.0 ** log2_scale * (base_RxV + pull * pull_RxV)
    if softcap is not None:
      logits_RxV = softcap * jnp.tanh(logits_RxV / softcap)
    logp_RxV = jax.nn.log_softmax(logits_RxV, axis=-1)
    mean_entropy = -jnp.mean(jnp.sum(jnp.exp(logp_RxV) * logp_RxV, axis=-1))
    mean_loss = -jnp.mean(jnp.take_along_axis(logp_RxV, targets_R[:, None], axis=-1))
    return mean_entropy, mean_loss

  def log2_scale(pull, steps):
    def excess_entropy(x):
      if softcap is None:
        return stats(x, pull)[0] - entropy
      # A cap flattens the top logits of large scales, and the entropy rises again: its rising branch counts as
      # below the target, so that the search ends on the falling one.
      (h, _), (dh, _) = jax.jvp(lambda y: stats(y, pull), (x,), (jnp.ones_like(x),))
      return jnp.where(dh < 0, h - entropy, -1.0)

    return _bisect(excess_entropy, -_LOG2_SCALE_RANGE, _LOG2_SCALE_RANGE, steps)

  # The pull's search needs the scale to ~1%, the final scale to ~0.01%.
  pull = _bisect(lambda p: stats(log2_scale(p, _SCALE_STEPS[0]), p)[1] - LOSS_PER_ENTROPY * entropy,
                 0.0, _MAX_PULL, _PULL_STEPS)
  x = log2_scale(pull, _SCALE_STEPS[1])
  return (2.0 ** x, pull) + stats(x, pull)


def make_lm_like(n, d, v, dtype, *, entropy=DEFAULT_ENTROPY, softcap=None, seed=0):
  """(e [N, D], c [V, D] in dtype, targets [N] int32) of the lm_like regime (module docstring).

  entropy: the mean entropy (nats) of softmax(softcap(e @ c.T)) on the first CALIBRATION_ROWS rows; softcap: the one
  the benchmark applies (it changes the softmax, so the calibration applies it too). Same seed, same arrays.
  """
  check_entropy(entropy, v)
  if d < 2:
    raise ValueError(f"lm_like needs d >= 2 (one coordinate holds the frequency prior), got d={d}")
  k_perm, k_topic, k_dirs, k_c, k_e = _keys(seed)
  log_f_V, topic_V = _vocabulary(k_perm, k_topic, v)
  topic_dirs = _topic_directions(k_dirs, _topics(v), d)
  c_VxD = _classifier(k_c, topic_dirs, log_f_V, topic_V, d, jnp.dtype(dtype))
  e_NxD, pull_NxD, targets_N = _hidden(k_e, topic_dirs, log_f_V, topic_V, c_VxD, n)
  r = slice(0, CALIBRATION_ROWS)
  scale, pull, reached, _ = _calibrate(e_NxD[r], pull_NxD[r], targets_N[r], c_VxD, jnp.float32(entropy), softcap)
  if abs(float(reached) - entropy) > _ENTROPY_TOLERANCE:
    raise ValueError(f"entropy={entropy} is out of reach at this shape and softcap={softcap} "
                     f"(got {float(reached):.2f} nats)")
  return (scale * (e_NxD + pull * pull_NxD)).astype(dtype), c_VxD, targets_N
