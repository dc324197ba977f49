"""Kernel refs by name. A Pallas kernel receives the refs of its inputs and outputs as one positional list whose
layout changes with the optional arrays (a bias, a reference, a second output, aliased inputs); `unpack` names
them once, in call order, instead of reading them at computed positions."""

from __future__ import annotations


def unpack(refs, **present) -> tuple:
  """The refs, one per keyword in order: the next ref where the keyword's value is true, None where it is false.

    e_ref, b_ref, out_ref = unpack(refs, e=True, bias=has_bias, out=True)

  Every ref must be named: a count that does not match is an error (the call site and the kernel disagree).
  """
  refs = list(refs)
  names = [name for name, used in present.items() if used]
  if len(refs) != len(names):
    raise ValueError(f"the kernel got {len(refs)} refs, the unpacking names {len(names)}: {names}")
  found = iter(refs)
  return tuple(next(found) if used else None for used in present.values())
