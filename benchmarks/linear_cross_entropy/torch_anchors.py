"""PyTorch anchors of the loss benchmark, run on the very tensors the JAX methods see (shared through DLPack).

- `apple_cce`: apple `cut_cross_entropy.linear_cross_entropy` (impl "cce", its default filtering: bf16 eps / 32);
- `apple_cce_exact`: the same with `filter_eps=None` (no gradient filtering);
- `liger`: Liger's `LigerFusedLinearCrossEntropyFunction` (chunked; it computes the gradients in its forward).

Usable where torch with CUDA and the packages are installed (torch is imported on first use); `available()` says
which anchors are.
"""

from __future__ import annotations

import importlib.metadata
import time

import jax
import numpy as np

ANCHORS = ("apple_cce", "apple_cce_exact", "liger")
_PACKAGES = {"apple_cce": "cut-cross-entropy", "apple_cce_exact": "cut-cross-entropy", "liger": "liger-kernel"}


def available() -> dict[str, str]:
  """{anchor: package version} for the anchors whose packages import and whose torch sees a CUDA GPU."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    if not torch.cuda.is_available():
      return {}
  except ImportError:
    return {}
  found = {}
  for anchor in ANCHORS:
    try:
      _loss(anchor, None)
      found[anchor] = importlib.metadata.version(_PACKAGES[anchor])
    except (ImportError, importlib.metadata.PackageNotFoundError):
      pass
  return found


def _loss(anchor, softcap):
  """A function (e [N, D], c [V, D], targets [N] int64) -> mean loss, for one anchor."""
  if anchor in ("apple_cce", "apple_cce_exact"):
    from cut_cross_entropy import linear_cross_entropy  # pylint: disable=import-outside-toplevel
    kw = {} if anchor == "apple_cce" else dict(filter_eps=None)
    return lambda e, c, t: linear_cross_entropy(e, c, t, softcap=softcap, impl="cce", **kw)
  if anchor == "liger":
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction  # pylint: disable=import-outside-toplevel

    def liger(e, c, t):
      out = LigerFusedLinearCrossEntropyFunction.apply(e, c, t, None, None, -100, 0.0, 0.0, "mean", softcap)
      return out[0] if isinstance(out, tuple) else out
    return liger
  raise ValueError(f"unknown anchor {anchor!r}; choose from {ANCHORS}")


def _median_ms(fn, repeats):
  import torch  # pylint: disable=import-outside-toplevel
  fn()
  fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def measure(anchor, e, c, targets, softcap, repeats):
  """Forward and loss + gradient times (ms), extra peak memory (MiB) and the results as JAX arrays.

  Extra memory is the peak allocated by torch during one loss + gradient beyond the inputs and the two gradient
  buffers.
  """
  import torch  # pylint: disable=import-outside-toplevel
  f = _loss(anchor, softcap)
  e_t, c_t = torch.from_dlpack(e), torch.from_dlpack(c)
  t_t = torch.from_dlpack(targets).long()

  def forward():
    with torch.no_grad():
      return f(e_t, c_t, t_t)

  e_g, c_g = e_t.detach().requires_grad_(), c_t.detach().requires_grad_()

  def both():
    loss = f(e_g, c_g, t_t)
    return (loss,) + torch.autograd.grad(loss, (e_g, c_g))

  fwd_ms = _median_ms(forward, repeats)
  fwd_bwd_ms = _median_ms(both, repeats)
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  base = torch.cuda.memory_allocated()
  loss, de, dc = both()
  torch.cuda.synchronize()
  grads = de.numel() * de.element_size() + dc.numel() * dc.element_size()
  extra_mib = (torch.cuda.max_memory_allocated() - base - grads) / 2**20
  results = tuple(jax.dlpack.from_dlpack(x.detach().float().contiguous()) for x in (loss, de, dc))
  del loss, de, dc
  torch.cuda.empty_cache()
  return fwd_ms, fwd_bwd_ms, extra_mib, results
