"""Autotuning `pallas_gpu`'s tile config: time a few candidates on the real inputs, keep the fastest, cache it.

  cfg = autotune.autotune(e, c, targets, softcap=30.0)              # measures, then caches the winner
  loss = cce_jax.linear_cross_entropy(e, c, targets, softcap=30.0, config=cfg)
  cfg = autotune.lookup(e, c, softcap=30.0)                          # later runs: the cached winner, or None

Each candidate's loss + gradient is jitted, checked against the first candidate's loss (a candidate that fails to
compile, e.g. for lack of shared memory, or disagrees is skipped) and timed (median of `repeats` after warm-up).
The cache is one JSON file ($CCE_JAX_AUTOTUNE_CACHE, default ~/.cache/cce_jax/autotune.json) keyed by the device
kind, N, V, D, both input dtypes, the softcap and whether the gradient is filtered; written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax.ops.linear_cross_entropy import mosaic_pipeline
from cce_jax.ops.linear_cross_entropy import timing
from cce_jax.ops.linear_cross_entropy.api import linear_cross_entropy
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig


def cache_path(path: str | None = None) -> str:
  return os.path.expanduser(path or os.environ.get("CCE_JAX_AUTOTUNE_CACHE", "~/.cache/cce_jax/autotune.json"))


def cache_key(e, c, *, softcap=None, filter_eps=None) -> str:
  """device kind | N | V | D | e dtype | c dtype | softcap | gradient mode, for e [*B, D] and c [V, D]."""
  n = int(np.prod(e.shape[:-1]))
  v, d = c.shape
  kind = jax.devices()[0].device_kind
  mode = "full" if filter_eps is None else "filtered"
  return f"{kind}|{n}|{v}|{d}|{jnp.dtype(e.dtype).name}|{jnp.dtype(c.dtype).name}|{softcap}|{mode}"


def default_candidates(n: int, v: int, d: int, *, softcap=None, filtered: bool = False) -> list[PallasGpuConfig]:
  """The heuristic's config first, then the variants the H100/H200 sweeps found competitive; `filtered` for a
  filtered gradient (the op's default is the full one, `filter_eps=None`)."""
  base = PallasGpuConfig.for_shape(n, v, d, softcap=softcap, filtered=filtered)
  variants = [base, dataclasses.replace(base, num_warps=4 if base.num_warps == 8 else 8),
              dataclasses.replace(base, num_stages=4), dataclasses.replace(base, block_n=64),
              dataclasses.replace(base, block_d=32), dataclasses.replace(base, dense_backward_above=0.3),
              dataclasses.replace(base, dense_backward_above=0.7)]
  if filtered:
    variants.append(dataclasses.replace(base, sort_vocabulary=True))
  if mosaic_pipeline.is_hopper():  # the Mosaic GPU kernels' alternatives, where the heuristic picks them
    variants += [dataclasses.replace(base, forward_kernel="triton"), dataclasses.replace(base, num_splits=2),
                 dataclasses.replace(base, dense_backward_kernel="xla")]
  return list(dict.fromkeys(variants))  # frozen dataclasses: drop duplicates, keep the order


def _read(path):
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}  # an unreadable cache is a cold cache: it is rewritten on the next tuning


def lookup(e, c, *, softcap=None, filter_eps=None, path=None) -> PallasGpuConfig | None:
  """The cached winner for these inputs' shape, dtypes, device and options, or None."""
  entry = _read(cache_path(path)).get(cache_key(e, c, softcap=softcap, filter_eps=filter_eps))
  return None if entry is None else PallasGpuConfig(**entry["config"])


def autotune(e, c, targets, *, softcap=None, filter_eps=None, candidates=None, repeats: int = 5,
             path: str | None = None, interpret: bool = False,
             timer: Callable | None = None) -> PallasGpuConfig:
  """Times `candidates` (default `default_candidates`) for loss + gradient on (e [*B, D], c [V, D], targets [*B]),
  caches and returns the fastest. timer(fn, args) -> ms overrides the device timing (tests)."""
  n = int(np.prod(e.shape[:-1]))
  v, d = c.shape
  if candidates is None:
    candidates = default_candidates(n, v, d, softcap=softcap, filtered=filter_eps is not None)
  candidates = list(candidates)
  if not candidates or not all(isinstance(k, PallasGpuConfig) for k in candidates):
    raise ValueError("candidates must be a non-empty list of PallasGpuConfig")
  timer = timer or (lambda fn, args: timing.median_ms(fn, args, repeats))
  results, reference = [], None
  for cfg in candidates:
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda e_, c_, cfg=cfg: linear_cross_entropy(e_, c_, targets, softcap=softcap, filter_eps=filter_eps,
                                                     implementation="pallas_gpu", config=cfg,
                                                     interpret=interpret), argnums=(0, 1)))
    try:
      loss = float(loss_and_grad(e, c)[0])
      if reference is None:
        reference = loss
      elif not abs(loss - reference) <= 1e-3 * max(1.0, abs(reference)):
        results.append((cfg, None, f"loss {loss} differs from {reference}"))
        continue
      results.append((cfg, float(timer(loss_and_grad, (e, c))), None))
    except Exception as err:  # pylint: disable=broad-except  (a candidate that cannot run is skipped)
      results.append((cfg, None, f"{type(err).__name__}: {str(err)[:200]}"))
  timed = [(ms, k) for k, (cfg, ms, _) in enumerate(results) if ms is not None]
  if not timed:
    raise RuntimeError("no autotune candidate ran: " + "; ".join(str(err) for _, _, err in results))
  best = results[min(timed)[1]][0]
  _write(cache_path(path), cache_key(e, c, softcap=softcap, filter_eps=filter_eps),
         {"config": dataclasses.asdict(best),
          "timings_ms": [[dataclasses.asdict(cfg), ms, err] for cfg, ms, err in results]})
  return best


def _write(path, key, entry):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  cache = _read(path)
  cache[key] = entry
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(cache, f, indent=1)
  os.replace(tmp, path)  # atomic: concurrent tuners never leave half a file
