"""Fixtures of the scaling tests: a private download cache per test, and Epoch AI's file fetched from a local copy.

The four packaged data sets are always there. Epoch AI's Chinchilla points are downloaded on first use, which tests
must not do over the network: `epoch_cache` fetches them through a `file://` URL of a local copy (the file named by
$CCE_JAX_EPOCH_CSV, the user's cache, or a `shared/data/scaling/` folder next to the repository) into a temporary
cache, and skips the test when there is no local copy.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from cce_jax.scaling import sources

ROOT = pathlib.Path(__file__).resolve().parents[2]
_EPOCH = sources.EPOCH_CHINCHILLA
EPOCH_COPIES = [pathlib.Path(p) for p in (
    os.environ.get("CCE_JAX_EPOCH_CSV"),
    sources.cached_path(_EPOCH),  # the user's cache, as the environment names it when the tests start
    ROOT.parent / "shared" / "data" / "scaling" / _EPOCH.folder / _EPOCH.file,
) if p]
"""Local copies of Epoch AI's file to fetch from, in order; the first one present is used."""


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
  """Every test sees an empty download cache of its own ($CCE_JAX_CACHE), never the user's."""
  cache = tmp_path_factory.mktemp("cce_jax_cache")
  monkeypatch.setenv("CCE_JAX_CACHE", str(cache))
  return cache


@pytest.fixture(scope="session")
def epoch_cache(tmp_path_factory):
  """A cache folder holding Epoch AI's file, fetched (hash checked) from a file:// URL of a local copy."""
  copy = next((p for p in EPOCH_COPIES if p.is_file()), None)
  if copy is None:
    pytest.skip("no local copy of Epoch AI's Chinchilla data (set CCE_JAX_EPOCH_CSV to one)")
  cache = tmp_path_factory.mktemp("epoch_cache")
  sources.fetch(_EPOCH, url=copy.resolve().as_uri(), cache=cache)
  return cache


@pytest.fixture
def epoch_csv(epoch_cache):
  """The path of Epoch AI's file in `epoch_cache`."""
  return sources.cached_path(_EPOCH, epoch_cache)
