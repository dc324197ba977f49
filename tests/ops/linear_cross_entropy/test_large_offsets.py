"""The Pallas kernels' index arithmetic at N·D and V·D > 2^31 elements, executed on CPU without the arrays.

The kernels index their refs in two dimensions (`c_ref[pl.ds(v_start, bv), pl.ds(d_start, bd)]`); the element
offset row·D + col is formed by Pallas's Triton lowering, in 64 bits for arrays over 2^32 bytes, and compiled GPU
runs at such a shape are `test_pallas_gpu_sizes.py`'s. What the kernels compute themselves (program ids times
tile sizes, moved-back edge tiles, vocabulary splits, row-maxima groups, D chunks) is checked here: each kernel's
jaxpr, traced from shapes only, is evaluated over intervals (every program id of its grid, every loop iteration),
and every integer it computes must fit its dtype, every ref access must lie inside its array, and the accesses
must reach the last element of c, e, dC and dE (offsets beyond 2^31). A kernel that formed a flat offset
row·D + col in int32 would overflow here. Values that follow from integers a kernel reads from memory (the
backward's lists of kept tiles) depend on those lists' contents and are left unchecked, with the accesses they
index. `base.block_start`, which places every tile, runs on int32 tile indices at that shape against int64 NumPy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import jax.tree_util as tree_util
import numpy as np
import pytest
from jax.extend import core as jex_core

import cce_jax
from cce_jax import PallasGpuConfig
from cce_jax.ops.linear_cross_entropy import base

# N·D = 2.9e9 and V·D = 4.1e9 elements (bf16: 5.7 and 8.2 GB), never allocated. The tiles' first elements lie
# beyond 2^31 too; D is no multiple of the D chunks, V / block_v no multiple of the row maxima's group of 8.
N, D, V = 700_001, 4100, 1_000_003
assert (N - 256) * D > 2**31 and (V - 256) * D > 2**31


@dataclasses.dataclass(frozen=True)
class Iv:
  """All values an integer (or bool) array may hold, lo..hi; `data`: derived from values read from memory;
  `rel`: ("rem" | "div" | "floor", x, m) when this is x mod m, x // m or (x // m)·m for x >= 0, so that
  x - x mod m and x - (x // m)·m keep their ranges (a group's first tile, a D chunk of a flat loop)."""

  lo: int
  hi: int
  data: bool = False
  rel: tuple | None = dataclasses.field(default=None, compare=False)


def _join(a, b):
  if a is None or b is None:
    return None
  return Iv(min(a.lo, b.lo), max(a.hi, b.hi), a.data or b.data)


def _is_int(aval):
  dtype = getattr(aval, "dtype", None)
  return dtype is not None and (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_)


def _corners(op, a, b):
  vals = [op(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
  return Iv(min(vals), max(vals), a.data or b.data)


def _trunc_div(x, y):
  q = abs(x) // abs(y)
  return q if (x >= 0) == (y > 0) else -q


def _div(a, b):
  if b.lo <= 0 <= b.hi:
    return None
  return _corners(_trunc_div, a, b)


def _sub(a, b):
  if b.rel is not None and b.rel[1] is a:
    kind, _, m = b.rel
    if kind == "rem":  # x - x mod m = (x // m)·m
      return Iv(a.lo // m * m, a.hi // m * m, a.data)
    if kind == "floor":  # x - (x // m)·m = x mod m
      return _floor_ops("remainder", a, Iv(m, m))
  return _corners(lambda x, y: x - y, a, b)


def _mul(a, b):
  out = _corners(lambda x, y: x * y, a, b)
  for q, m in ((a, b), (b, a)):
    if q.rel is not None and q.rel[0] == "div" and m.lo == m.hi == q.rel[2]:
      return dataclasses.replace(out, rel=("floor",) + q.rel[1:])
  return out


def _floor_ops(name, x, y):
  """jnp's floor_divide and remainder of x >= 0 by a constant y > 0 (their jaxprs' sign fix-ups never fire)."""
  if x is None or y is None or x.lo < 0 or y.lo != y.hi or y.lo <= 0:
    return None
  m = y.lo
  if name == "floor_divide":
    return Iv(x.lo // m, x.hi // m, x.data, ("div", x, m))
  whole = x.hi // m > x.lo // m
  return Iv(0 if whole else x.lo % m, m - 1 if whole else x.hi % m, x.data, ("rem", x, m))


def _rem(a, b):
  m = max(abs(b.lo), abs(b.hi)) - 1
  lo = 0 if a.lo >= 0 else -min(m, -a.lo)
  return Iv(lo, min(m, max(a.hi, 0)), a.data or b.data)


_BINARY = {
    "add": lambda a, b: _corners(lambda x, y: x + y, a, b),
    "sub": _sub,
    "mul": _mul,
    "max": lambda a, b: Iv(max(a.lo, b.lo), max(a.hi, b.hi), a.data or b.data),
    "min": lambda a, b: Iv(min(a.lo, b.lo), min(a.hi, b.hi), a.data or b.data),
    "div": _div,
    "rem": _rem,
}
_BOOL = {"eq", "ne", "lt", "le", "gt", "ge", "is_finite"}
# The values of the first operand, of some operands, or of all of them, rearranged.
_FIRST = {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "slice", "dynamic_slice", "rev",
          "copy", "copy_p", "reduce_max", "reduce_min", "convert_element_type"}
_SOME = {"select_n": slice(1, None), "dynamic_update_slice": slice(0, 2), "concatenate": slice(None),
         "pad": slice(None)}


class _Analysis:
  """Evaluates kernel jaxprs over intervals: `overflows` lists integers that may leave their dtype, `accesses`
  every ref access (its array's shape, the interval of each index, whether it depends on loaded data)."""

  def __init__(self, grid):
    self.grid = grid
    self.overflows, self.accesses = [], []

  def run(self, jaxpr, args):
    env = dict(zip(jaxpr.invars, args))
    read = lambda v: self._literal(v.val) if isinstance(v, jex_core.Literal) else env.get(v)
    for eqn in jaxpr.eqns:
      outs = self._eqn(eqn, [read(v) for v in eqn.invars])
      for var, val in zip(eqn.outvars, outs):
        if val is not None and not val.data and _is_int(var.aval) and var.aval.dtype != jnp.bool_:
          info = jnp.iinfo(var.aval.dtype)
          if val.lo < info.min or val.hi > info.max:
            self.overflows.append((eqn.primitive.name, val, str(var.aval.dtype), _where(eqn)))
        env[var] = val
    return [read(v) for v in jaxpr.outvars]

  @staticmethod
  def _literal(value):
    value = np.asarray(value)
    if value.dtype.kind not in "iub":
      return None
    return Iv(int(value.min()), int(value.max()))

  def _closed(self, closed, args):
    return self.run(closed.jaxpr, [self._literal(c) for c in closed.consts] + list(args))

  def _eqn(self, eqn, args):
    name, params = eqn.primitive.name, eqn.params
    n_out = len(eqn.outvars)
    if name in ("get", "swap", "masked_swap", "masked_load", "load", "addupdate"):
      return self._access(eqn, args)
    if name == "program_id":
      return [Iv(0, self.grid[params["axis"]] - 1)]
    if name == "num_programs":
      return [Iv(self.grid[params["axis"]], self.grid[params["axis"]])]
    if name in ("pjit", "jit", "closed_call", "core_call"):
      if params.get("name") in ("floor_divide", "remainder") and len(args) == 2:
        exact = _floor_ops(params["name"], *args)
        if exact is not None:
          return [exact]
      return self._closed(params["jaxpr"], args)
    if name == "cond":
      outs = [self._closed(branch, args[1:]) for branch in params["branches"]]
      return [_fold(_join, vals) for vals in zip(*outs)]
    if name == "while":
      return self._while(eqn, args)
    if n_out != 1 or not _is_int(eqn.outvars[0].aval):
      return [None] * n_out
    if name == "iota":
      return [Iv(0, params["shape"][params["dimension"]] - 1)]
    if name in _BOOL or (name in ("and", "or", "not") and eqn.outvars[0].aval.dtype == jnp.bool_):
      return [Iv(0, 1)]
    if not args or any(a is None for a in args[slice(0, 1) if name in _FIRST else _SOME.get(name, slice(None))]):
      return [None]
    ints = args
    if name in _BINARY and len(ints) == 2:
      return [_BINARY[name](*ints)]
    if name in _FIRST:
      return [ints[0]]
    if name in _SOME:
      return [_fold(_join, ints[_SOME[name]])]
    if name == "neg":
      return [Iv(-ints[0].hi, -ints[0].lo, ints[0].data)]
    if name == "sign":
      sign = lambda x: (x > 0) - (x < 0)
      return [Iv(sign(ints[0].lo), sign(ints[0].hi), ints[0].data)]
    if name == "abs":
      a = ints[0]
      return [Iv(0 if a.lo <= 0 <= a.hi else min(abs(a.lo), abs(a.hi)), max(abs(a.lo), abs(a.hi)), a.data)]
    return [None] * n_out

  def _access(self, eqn, args):
    """Records a ref access (the indices of `get`, `swap`, `masked_swap`, ...) and returns what it reads."""
    tree = eqn.params.get("tree") or eqn.params.get("args_tree")
    if "args_tree" in eqn.params:
      _, transforms, *_ = tree_util.tree_unflatten(tree, args)
    else:
      leaves = args[1:] if eqn.primitive.name == "get" else args[2:]
      transforms = tree_util.tree_unflatten(tree, leaves)
    for indexer in transforms:
      if hasattr(indexer, "indices"):
        spans = []
        for index in indexer.indices:
          start, size = (index.start, index.size) if hasattr(index, "size") else (index, 1)
          stride = getattr(index, "stride", 1)
          start = Iv(start, start) if isinstance(start, int) else start
          spans.append(None if start is None
                       else Iv(start.lo, start.hi + (size - 1) * stride, start.data))
        self.accesses.append((tuple(indexer.shape), spans, _where(eqn)))
    if not eqn.outvars or not _is_int(eqn.outvars[0].aval):
      return [None] * len(eqn.outvars)
    return [Iv(0, 2**31 - 1, True)] * len(eqn.outvars)

  def _while(self, eqn, args):
    """The loop's carries over every iteration: a fixpoint of the body, with the fori_loop counter bounded by its
    condition (`i < upper`) inside the body."""
    p = eqn.params
    cond, body = p["cond_jaxpr"], p["body_jaxpr"]
    body_consts = args[p["cond_nconsts"]:p["cond_nconsts"] + p["body_nconsts"]]
    carry = list(args[p["cond_nconsts"] + p["body_nconsts"]:])
    counter = bound = None
    eqns = cond.jaxpr.eqns
    if len(eqns) == 1 and eqns[0].primitive.name == "lt" and all(v in cond.jaxpr.invars for v in eqns[0].invars):
      counter, bound = (cond.jaxpr.invars.index(v) - p["cond_nconsts"] for v in eqns[0].invars)
    for step in range(12):
      inside = list(carry)
      if counter is not None and carry[counter] is not None and carry[bound] is not None:
        c = carry[counter]
        inside[counter] = Iv(c.lo, min(c.hi, carry[bound].hi - 1), c.data or carry[bound].data)
      new = [_join(a, b) for a, b in zip(carry, self._closed(body, list(body_consts) + inside))]
      if new == carry:
        return carry
      if step >= 2:  # widen: the counter to its bound, anything else still growing to unknown
        new = [n if n == c else (Iv(n.lo, max(n.hi, carry[bound].hi), n.data) if k == counter and n is not None
                                 and carry[bound] is not None else None)
               for k, (c, n) in enumerate(zip(carry, new))]
      carry = new
    raise AssertionError("the loop's intervals did not settle")


def _fold(f, values):
  values = list(values)
  out = values[0]
  for v in values[1:]:
    out = f(out, v)
  return out


def _where(eqn):
  """Where the kernel source computes eqn (file:line), for the failure messages."""
  try:
    from jax._src import source_info_util
    return source_info_util.summarize(eqn.source_info)
  except (ImportError, AttributeError):
    return eqn.primitive.name


def _kernels(fn, *shapes):
  """(name, kernel jaxpr, grid) of every pallas_call in fn's jaxpr, traced from the shapes."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        kernel = eqn.params["jaxpr"]
        found.append((kernel.debug_info.func_name, kernel, eqn.params["grid_mapping"].grid))
        continue
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          if isinstance(sub, jex_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*shapes).jaxpr)
  return found


def _config(low_memory):
  return dataclasses.replace(PallasGpuConfig.for_shape(N, V, D, softcap=30.0, filtered=True),
                             low_memory=low_memory, dense_backward_above=1.0)


MODES = {  # the op's kernels in each mode: the forward, and the tile-skipping backwards
    "filtered": lambda e, c, t: cce_jax.linear_cross_entropy(
        e, c, t, softcap=30.0, implementation="pallas_gpu", config=_config(False), filter_eps="auto",
        interpret=True),
    "filtered_low_memory": lambda e, c, t: cce_jax.linear_cross_entropy(
        e, c, t, softcap=30.0, implementation="pallas_gpu", config=_config(True), filter_eps="auto",
        interpret=True),
    # five vocabulary splits, one loop over (vocabulary tile, D chunk) pairs
    "logprobs_splits_flat_loop": lambda e, c, t: jnp.sum(cce_jax.token_logprobs(
        e, c, t, temperature=0.7, return_entropy=True, implementation="pallas_gpu", interpret=True,
        config=dataclasses.replace(_config(False), num_splits=5, flat_loop=True))[1]),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_kernel_index_arithmetic_at_offsets_beyond_int32(mode):
  shapes = (jax.ShapeDtypeStruct((N, D), jnp.bfloat16), jax.ShapeDtypeStruct((V, D), jnp.bfloat16),
            jax.ShapeDtypeStruct((N,), jnp.int32))
  kernels = _kernels(jax.grad(MODES[mode], argnums=(0, 1)), *shapes)
  assert kernels and ("logprobs" in mode or len(kernels) >= 3), [k[0] for k in kernels]
  reach = {}
  for name, jaxpr, grid in kernels:
    analysis = _Analysis(grid)
    analysis.run(jaxpr, [None] * len(jaxpr.invars))
    assert not analysis.overflows, (name, analysis.overflows[:3])
    for shape, spans, where in analysis.accesses:
      assert None not in spans, (name, shape, where)  # every index known
      if not any(s.data for s in spans):
        assert all(0 <= s.lo and s.hi < dim for s, dim in zip(spans, shape)), (name, shape, spans, where)
        offset = sum(s.hi * math.prod(shape[k + 1:]) for k, s in enumerate(spans))
        reach[shape] = max(reach.get(shape, 0), offset)
  # c and e (and in the backward dC, dE) are read up to their last element: offsets beyond int32.
  assert reach[(V, D)] == V * D - 1 and reach[(N, D)] == N * D - 1, reach


@pytest.mark.parametrize("size,block", [(V, 128), (V, 256), (D, 64), (D, 32), (N, 16)])
def test_block_start_places_every_tile_at_large_sizes(size, block):
  """`base.block_start` on int32 tile indices (as the kernels call it): int64 NumPy's starts (the last tile moved
  back to end at the edge), and the tiles' new entries cover [0, size) exactly once; for the rows of c and e, the
  last tile ends at element size·D - 1 > 2^31."""
  tiles = -(-size // block)
  start, first = base.block_start(jnp.arange(tiles, dtype=jnp.int32), block, size)
  want_first = np.arange(tiles, dtype=np.int64) * block
  np.testing.assert_array_equal(np.asarray(first, np.int64), want_first)
  np.testing.assert_array_equal(np.asarray(start, np.int64), np.minimum(want_first, size - block))
  count = np.zeros(size, np.int64)
  for s, f in zip(np.asarray(start, np.int64), want_first):
    count[f:s + block] += 1
  np.testing.assert_array_equal(count, 1)
  if size != D:  # rows of a [size, D] array: the last row's last element
    assert (int(start[-1]) + block - 1) * D + D - 1 == size * D - 1 >= 2**31
