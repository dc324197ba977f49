"""Device time of a jitted function: what `autotune` measures its candidates with (and the benchmarks reuse)."""

from __future__ import annotations

import time

import jax
import numpy as np


def median_ms(fn, args, repeats):
  """The median wall time (ms) of `repeats` calls of fn(*args), each blocked on its results, after two warm-up
  calls (compilation, then a first run)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))
