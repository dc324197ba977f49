"""Where the scaling data come from: the packaged data sets, the cache location, the checked download of Epoch AI's
file (through file:// URLs, never the network) and the order in which `folder` looks."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re

import pytest

from cce_jax.scaling import sources

FIXTURE = b"Model Size,Training FLOP,loss\n1e9,6e18,3.0\n2e9,2.4e19,2.8\n"


def _download(tmp_path, data=FIXTURE):
  """A small file and a Download pinned to its hash, fetched from its file:// URL."""
  path = tmp_path / "upstream" / "points.csv"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return dataclasses.replace(sources.EPOCH_CHINCHILLA, url=path.as_uri(), sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("name", sources.PACKAGED)
def test_packaged_data_sets_carry_licence_and_provenance(name):
  folder = sources.folder(name)
  assert folder == sources.PACKAGED_ROOT / name and folder.is_dir()
  assert any(folder.rglob("*.csv"))
  licence = (folder / "LICENSE").read_text(encoding="utf-8")
  assert ("MIT License" in licence and "Copyright (c)" in licence) or "Apache License" in licence
  provenance = (folder / "PROVENANCE.md").read_text(encoding="utf-8")
  assert re.search(r"https://github\.com/\S+", provenance) and re.search(r"`[0-9a-f]{40}`", provenance)
  assert "## What was changed" in provenance


def test_the_epoch_file_is_not_packaged():
  assert sources.EPOCH_CHINCHILLA.folder not in sources.PACKAGED
  assert not (sources.PACKAGED_ROOT / sources.EPOCH_CHINCHILLA.folder).exists()
  assert re.search(r"/[0-9a-f]{40}/", sources.EPOCH_CHINCHILLA.url)  # pinned to a commit


def test_cache_dir_order(monkeypatch, tmp_path):
  monkeypatch.setenv("CCE_JAX_CACHE", str(tmp_path / "a"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert sources.cache_dir() == tmp_path / "a"
  monkeypatch.delenv("CCE_JAX_CACHE")
  assert sources.cache_dir() == tmp_path / "xdg" / "cce_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert sources.cache_dir() == tmp_path / "home" / ".cache" / "cce_jax"


def test_fetch_from_a_file_url_caches_and_reuses(tmp_path, private_cache):
  download = _download(tmp_path)
  path = sources.fetch(download)
  assert path == private_cache / "scaling" / download.folder / download.file
  assert path.read_bytes() == FIXTURE
  # Cached: the (now unreadable) URL is not read again.
  (tmp_path / "upstream" / "points.csv").unlink()
  assert sources.fetch(download) == path
  # A cached file with the wrong bytes is downloaded again.
  path.write_bytes(b"tampered")
  with pytest.raises(sources.DataUnavailable, match="not cached and downloading it failed"):
    sources.fetch(download)


def test_fetch_with_a_wrong_hash_caches_nothing(tmp_path, private_cache):
  download = dataclasses.replace(_download(tmp_path), sha256="0" * 64)
  with pytest.raises(sources.ChecksumMismatch, match=f"has sha256 {hashlib.sha256(FIXTURE).hexdigest()}, expected "
                     f"0{{64}} .*nothing was cached"):
    sources.fetch(download)
  assert not [p for p in private_cache.rglob("*") if p.is_file()]


def test_fetch_failure_says_how_to_get_the_file(tmp_path, private_cache):
  download = _download(tmp_path)
  with pytest.raises(sources.DataUnavailable) as info:
    sources.fetch(download, url=(tmp_path / "nowhere.csv").as_uri())
  message = str(info.value)
  for needed in ("from file://", download.url, str(sources.cached_path(download, private_cache)),
                 "--data_root=DIR", "epoch_chinchilla_replication/svg_extracted_data.csv"):
    assert needed in message, needed


def test_folder_prefers_data_root_then_packaged_then_cache(tmp_path, monkeypatch):
  own = tmp_path / "root" / "gadre2024_overtraining"
  own.mkdir(parents=True)
  assert sources.folder("gadre2024_overtraining", tmp_path / "root") == own
  assert sources.folder("porian2024_resolving_discrepancies", tmp_path / "root") == \
      sources.PACKAGED_ROOT / "porian2024_resolving_discrepancies"
  with pytest.raises(ValueError, match="unknown scaling data set 'nope'"):
    sources.folder("nope")

  download = _download(tmp_path)
  monkeypatch.setitem(sources.DOWNLOADS, download.folder, download)
  # Under data_root (an empty folder of that name does not count): used as is, nothing downloaded.
  (tmp_path / "root" / download.folder).mkdir()
  local = tmp_path / "offline" / download.folder / download.file
  local.parent.mkdir(parents=True)
  local.write_bytes(b"my own copy")
  assert sources.folder(download.folder, tmp_path / "offline") == local.parent
  assert not sources.cached_path(download).exists()
  # Elsewhere: downloaded to the cache.
  assert sources.folder(download.folder, tmp_path / "root") == sources.cached_path(download).parent
  assert sources.cached_path(download).read_bytes() == FIXTURE


def test_folder_without_any_copy_names_data_root(tmp_path, monkeypatch):
  download = dataclasses.replace(_download(tmp_path), url=(tmp_path / "gone.csv").as_uri())
  monkeypatch.setitem(sources.DOWNLOADS, download.folder, download)
  with pytest.raises(sources.DataUnavailable, match=re.escape(
      f"data_root has no {tmp_path / 'root' / download.folder / download.file}, and the file ")):
    sources.folder(download.folder, tmp_path / "root")
  with pytest.raises(FileNotFoundError, match="is not cached"):
    sources.folder(download.folder)


def test_the_pinned_hash_matches_a_local_copy(epoch_csv):
  assert hashlib.sha256(pathlib.Path(epoch_csv).read_bytes()).hexdigest() == sources.EPOCH_CHINCHILLA.sha256
