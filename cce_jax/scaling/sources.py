"""Where the public scaling data sets come from: four ship in this package, Epoch AI's is downloaded on first use.

Gadre+24, Luo+25 (MIT), Muennighoff+23 (Apache-2.0) and Porian+24 (MIT) are in `cce_jax/scaling/data/<folder>/` with
their licence and a PROVENANCE.md. Epoch AI's digitised Chinchilla points carry no licence upstream, so they are not
bundled: `fetch` downloads the file from a URL pinned to an upstream commit, checks its SHA-256 and caches it as
`{cache_dir()}/scaling/<folder>/<file>`. The cache is `$CCE_JAX_CACHE`, else `$XDG_CACHE_HOME/cce_jax`, else
`~/.cache/cce_jax`; `{cache_dir()}/scaling` is itself a valid `data_root`.

`folder(name, data_root)` is what the loaders and reproductions use: `{data_root}/<name>/` when it is there (offline
use, or your own copy), else the packaged copy, else the cached download (downloading on a miss).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

PACKAGED_ROOT = pathlib.Path(__file__).resolve().parent / "data"
"""The folder holding the bundled data sets, one sub-folder each."""

PACKAGED = ("gadre2024_overtraining", "luo2025_multipower_lr_schedules", "muennighoff2023_datablations",
            "porian2024_resolving_discrepancies")
"""The data sets shipped inside the package (their licences allow it)."""


@dataclasses.dataclass(frozen=True)
class Download:
  """A data file fetched on first use: `url` pinned to an upstream commit, `sha256` of its exact bytes."""

  folder: str
  file: str
  url: str
  sha256: str
  description: str


EPOCH_CHINCHILLA = Download(
    folder="epoch_chinchilla_replication", file="svg_extracted_data.csv",
    url=("https://raw.githubusercontent.com/epoch-research/analyzing-chinchilla/"
         "92258837425e1b5f2851d624287f0120583a3d0e/data/svg_extracted_data.csv"),
    sha256="193478df4e90f040016431996c45682659306840ecdadf83cfb9cd5ca0aa1b30",
    description="Epoch AI's Chinchilla points (Besiroglu et al. 2024)")

DOWNLOADS = {d.folder: d for d in (EPOCH_CHINCHILLA,)}
"""Data sets downloaded on first use, by folder name."""


class DataUnavailable(FileNotFoundError):
  """A data set is not under data_root, not packaged, not cached, and could not be downloaded."""


class ChecksumMismatch(ValueError):
  """A downloaded file's SHA-256 differs from the pinned one (nothing is cached)."""


def cache_dir() -> pathlib.Path:
  """$CCE_JAX_CACHE, else $XDG_CACHE_HOME/cce_jax, else ~/.cache/cce_jax (not created here)."""
  if os.environ.get("CCE_JAX_CACHE"):
    return pathlib.Path(os.environ["CCE_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "cce_jax"


def cached_path(download: Download, cache: str | os.PathLike | None = None) -> pathlib.Path:
  """Where `download` is (or would be) cached: {cache}/scaling/<folder>/<file>."""
  return pathlib.Path(cache if cache is not None else cache_dir()) / "scaling" / download.folder / download.file


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def how_to_get(download: Download, cache: str | os.PathLike | None = None) -> str:
  """One sentence on getting `download` by hand (for error messages)."""
  return (f"download {download.url} to {cached_path(download, cache)}, or pass data_root=DIR "
          f"(fit_scaling.py --data_root=DIR) with DIR/{download.folder}/{download.file}")


def fetch(download: Download = EPOCH_CHINCHILLA, *, url: str | None = None, cache: str | os.PathLike | None = None,
          timeout: float = 60.0) -> pathlib.Path:
  """The cached file of `download`, downloaded first (from `url`, default the pinned one) when it is not cached.

  A cached file whose hash is wrong is downloaded again. The download is checked against `download.sha256` before
  anything is written: a mismatch raises ChecksumMismatch and caches nothing. A failed download raises
  DataUnavailable saying how to get the file by hand. `file://` URLs work (tests, mirrors).
  """
  target = cached_path(download, cache)
  if target.is_file() and _sha256(target.read_bytes()) == download.sha256:
    return target
  url = url or download.url
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      data = response.read()
  except (urllib.error.URLError, OSError, ValueError) as e:
    reason = getattr(e, "reason", e)
    source = "" if url == download.url else f" from {url}"
    raise DataUnavailable(f"the file {download.folder}/{download.file} ({download.description}) is not cached and "
                          f"downloading it{source} failed ({reason}); {how_to_get(download, cache)}") from e
  digest = _sha256(data)
  if digest != download.sha256:
    raise ChecksumMismatch(f"{url} has sha256 {digest}, expected {download.sha256} for {download.description}; "
                           "nothing was cached")
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, target)  # atomic: a concurrent reader sees the old file or the whole new one
  except BaseException:
    os.unlink(tmp)
    raise
  return target


def folder(name: str, data_root: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder of data set `name` (e.g. "gadre2024_overtraining"): {data_root}/<name>/ when it holds the data,
  else the packaged copy, else (for a downloaded data set) the cache, fetched first when it is not cached.

  ValueError for an unknown name; DataUnavailable when nothing is found, naming the URL and data_root.
  """
  if name not in PACKAGED and name not in DOWNLOADS:
    raise ValueError(f"unknown scaling data set {name!r}; known: {sorted((*PACKAGED, *DOWNLOADS))}")
  remote = DOWNLOADS.get(name)
  local = None if data_root is None else pathlib.Path(data_root) / name
  if local is not None and ((local / remote.file).is_file() if remote else local.is_dir()):
    return local
  if remote is None:
    return PACKAGED_ROOT / name
  try:
    return fetch(remote).parent
  except DataUnavailable as e:
    if local is None:
      raise
    raise DataUnavailable(f"data_root has no {local / remote.file}, and {e}") from e
