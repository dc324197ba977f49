"""Cloud TPU accelerator types (`v5litepod-16`, `v4-32`, ...): hosts, chips per host, GKE names, runtime version.

The numbers follow Google's published slice shapes: v4 and v5p count TensorCores (two per chip) in the type's
suffix, v5e (`v5litepod`) and v6e count chips; a multi-host slice has 4 chips per host, and v5e / v6e slices of
1, 4 or 8 chips are one host. GKE selects TPU nodes by accelerator name and topology (chips along each axis).
"""

from __future__ import annotations

import dataclasses
import re

# generation: (suffix counts cores, GKE accelerator label, default TPU VM runtime, topology rank)
_GENERATIONS = {
    "v4": (True, "tpu-v4-podslice", "tpu-ubuntu2204-base", 3),
    "v5p": (True, "tpu-v5p-slice", "v2-alpha-tpuv5", 3),
    "v5litepod": (False, "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite", 2),
    "v6e": (False, "tpu-v6e-slice", "v2-alpha-tpuv6e", 2),
}
_SINGLE_HOST_2D = (1, 4, 8)  # v5e / v6e slices that are one host
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                512: "8x8x8"}


class TpuTypeError(ValueError):
  """An accelerator type this table does not know, or a topology it cannot name."""


@dataclasses.dataclass(frozen=True)
class TpuType:
  name: str  # as gcloud takes it, e.g. "v5litepod-16"
  chips: int
  hosts: int
  chips_per_host: int
  gke_accelerator: str
  runtime_version: str
  topology: str | None  # None when the table has no entry (pass --tpu_topology)


def parse(name: str, topology: str | None = None) -> TpuType:
  """The slice shape of an accelerator type such as "v5litepod-16"; TpuTypeError for an unknown one."""
  match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", name)
  if match is None:
    raise TpuTypeError(f"--tpu_type={name!r}: expected one of {', '.join(f'{g}-N' for g in _GENERATIONS)}")
  generation, count = match.group(1), int(match.group(2))
  counts_cores, gke_accelerator, runtime, rank = _GENERATIONS[generation]
  chips = count // 2 if counts_cores else count
  if chips < 1 or (counts_cores and count % 2):
    raise TpuTypeError(f"--tpu_type={name!r}: {generation} sizes count TensorCores, two per chip")
  if rank == 2 and chips in _SINGLE_HOST_2D:
    hosts, per_host = 1, chips
  elif chips <= 4:
    hosts, per_host = 1, chips
  elif chips % 4:
    raise TpuTypeError(f"--tpu_type={name!r}: {chips} chips do not fill hosts of 4")
  else:
    hosts, per_host = chips // 4, 4
  known = (_TOPOLOGY_2D if rank == 2 else _TOPOLOGY_3D).get(chips)
  return TpuType(name, chips, hosts, per_host, gke_accelerator, runtime, topology or known)
