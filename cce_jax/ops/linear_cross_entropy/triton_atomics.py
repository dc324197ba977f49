"""A relaxed-order atomic add for Pallas-Triton kernels.

`jax.experimental.pallas.triton.atomic_add` lowers every element to an acquire-release atomic. A gradient
accumulator needs no ordering between its adds (the kernel's end publishes them), and on Hopper relaxed adds
issue without waiting on each other. `atomic_add` here is the same operation with relaxed memory order on the
Triton lowering; everywhere else (interpret mode, discharge) it is `plgpu.atomic_add`'s rule unchanged.

The lowering reuses Pallas-Triton's own rule through private jax modules (present in jax 0.11.2 and 0.12.x). If
they are missing, `atomic_add` is `plgpu.atomic_add`; `RELAXED_AVAILABLE` says which one is in use.
"""

from __future__ import annotations

import threading

from jax.experimental.pallas import triton as plgpu

try:
  from jax._src import core as _jax_core
  from jax._src import tree_util as _tree_util
  from jax._src.lib.triton import dialect as _tt_dialect
  from jax._src.pallas.triton import lowering as _lowering
  from jax._src.pallas.triton import primitives as _primitives
  from jax._src.state import discharge as _state_discharge
  from jax._src.state import primitives as _state_primitives

  # Installed once per process (a module reload must not wrap the wrapper); the flag lives on jax's module.
  if not hasattr(_lowering, "_cce_relaxed_flag"):
    _lowering._cce_relaxed_flag = threading.local()
    _original_atomic_rmw = _lowering._atomic_rmw

    def _atomic_rmw(*args, **kwargs):
      # Unchanged for every caller unless the relaxed rule below has set the thread-local flag.
      if getattr(_lowering._cce_relaxed_flag, "on", False) and "semantic" not in kwargs:
        kwargs["semantic"] = _tt_dialect.MemSemantic.RELAXED
      return _original_atomic_rmw(*args, **kwargs)

    _lowering._atomic_rmw = _atomic_rmw
  _flag = _lowering._cce_relaxed_flag

  relaxed_atomic_rmw_p = _jax_core.Primitive("cce_relaxed_atomic_rmw")
  relaxed_atomic_rmw_p.def_effectful_abstract_eval(_primitives._atomic_abstract_eval)
  _state_discharge.register_discharge_rule(relaxed_atomic_rmw_p)(_primitives._atomic_rmw_discharge_rule)

  @_lowering.register_lowering(relaxed_atomic_rmw_p)
  def _relaxed_lowering_rule(ctx, *args_flat, **params):
    _flag.on = True
    try:
      return _primitives._atomic_lowering_rule(ctx, *args_flat, **params)
    finally:
      _flag.on = False

  def atomic_add(ref, idx, val):
    """`ref[idx] += val` with relaxed memory order (no ordering against other memory operations)."""
    x_ref, transforms = _state_primitives.get_ref_and_transforms(ref, idx, "atomic_rmw")
    args_flat, args_tree = _tree_util.tree_flatten((x_ref, transforms, val, None))
    return relaxed_atomic_rmw_p.bind(*args_flat, args_tree=args_tree,
                                     atomic_type=_primitives.AtomicOpType.ADD)

  RELAXED_AVAILABLE = True
except (ImportError, AttributeError):  # pragma: no cover - depends on jax internals
  RELAXED_AVAILABLE = False

  def atomic_add(ref, idx, val):
    """`ref[idx] += val` atomically (acquire-release: this jax lacks the internals for relaxed order)."""
    return plgpu.atomic_add(ref, idx, val)
