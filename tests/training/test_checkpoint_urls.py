"""A gs:// workdir, end to end without a cloud: Orbax saves, restores, quarantines and resumes through the real
URL code paths (etils.epath over fsspec, tensorstore's GCS driver over HTTP) against a fake bucket on this disk.

The fake is one local folder reached two ways, as a bucket is: an HTTP server speaking the slice of the GCS JSON API
that tensorstore uses (read with ranges and generation conditions, media upload, delete, list), at
TENSORSTORE_GCS_HTTP_URL; and an fsspec "gcs" filesystem for epath (standing in for gcsfs). Orbax asks
google-cloud-storage whether the bucket has a hierarchical namespace; a stub client answers no. s3:// (which Orbax
cannot write arrays to) ends with one line, as does gs:// without its packages.
"""

from __future__ import annotations

import http.server
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading
import types
import urllib.parse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from cce_jax.training import checkpoint as checkpoint_lib
from cce_jax.training import metrics as metrics_lib
from cce_jax.training import trainer
from cce_jax.training.validate import ConfigError
from tests.training.test_trainer import small_config


class _Bucket:
  """Objects as files under root/{bucket}/{name}; generations count writes (files written through fsspec get one
  when first seen or changed)."""

  def __init__(self, root):
    self.root, self.lock, self.generations, self.counter, self.requests = root, threading.Lock(), {}, 0, []

  def generation(self, path):
    st = os.stat(path)
    signature = (st.st_ino, st.st_mtime_ns, st.st_size)
    generation, seen = self.generations.get(path, (None, None))
    if seen != signature:
      self.counter += 1
      generation = self.counter
      self.generations[path] = (generation, signature)
    return generation


def _handler(bucket: _Bucket):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
      del args

    def _reply(self, code, body=b"", headers=()):
      self.send_response(code)
      for key, value in headers:
        self.send_header(key, value)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def _json(self, code, obj):
      self._reply(code, json.dumps(obj).encode(), [("Content-Type", "application/json")])

    def _request(self):
      url = urllib.parse.urlsplit(self.path)
      bucket.requests.append((self.command, url.path))
      return url.path.split("/"), {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}

    def _object(self, name, path, generation):
      return {"name": name, "generation": str(generation), "size": str(os.path.getsize(path))}

    @staticmethod
    def _failed(query, generation):
      """The HTTP status of an unmet generation condition (0 = must not exist), None if met."""
      if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != (generation or 0):
        return 412
      if "ifGenerationNotMatch" in query and generation == int(query["ifGenerationNotMatch"]):
        return 304
      return None

    def do_GET(self):  # pylint: disable=invalid-name
      parts, query = self._request()
      with bucket.lock:
        if len(parts) == 6 and parts[5] == "o":  # /storage/v1/b/{bucket}/o: list
          base, items = os.path.join(bucket.root, parts[4]), []
          for folder, _, files in os.walk(base):
            for f in files:
              path = os.path.join(folder, f)
              name = os.path.relpath(path, base)
              if (name.startswith(query.get("prefix", "")) and name >= query.get("startOffset", "")
                  and ("endOffset" not in query or name < query["endOffset"])):
                items.append(self._object(name, path, bucket.generation(path)))
          return self._json(200, {"items": sorted(items, key=lambda item: item["name"])})
        name = urllib.parse.unquote("/".join(parts[6:]))  # /storage/v1/b/{bucket}/o/{name}
        path = os.path.join(bucket.root, parts[4], name)
        if not os.path.isfile(path):
          return self._json(404, {"error": {"code": 404, "message": "No such object"}})
        generation = bucket.generation(path)
        if code := self._failed(query, generation):
          return self._reply(code)
        if query.get("alt") != "media":
          return self._json(200, self._object(name, path, generation))
        with open(path, "rb") as f:
          data = f.read()
        headers = [("x-goog-generation", str(generation)), ("Content-Type", "application/octet-stream")]
        if ranges := self.headers.get("Range"):
          first, last = ranges.split("=")[1].split("-")
          start = int(first) if first else max(0, len(data) - int(last))
          end = int(last) + 1 if first and last else len(data)
          headers.append(("Content-Range", f"bytes {start}-{start + len(data[start:end]) - 1}/{len(data)}"))
          return self._reply(206, data[start:end], headers)
        return self._reply(200, data, headers)

    def do_POST(self):  # pylint: disable=invalid-name
      parts, query = self._request()  # /upload/storage/v1/b/{bucket}/o?uploadType=media&name=...
      body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
      path = os.path.join(bucket.root, parts[5], query["name"])
      with bucket.lock:
        if self._failed(query, bucket.generation(path) if os.path.isfile(path) else None):
          return self._json(412, {"error": {"code": 412, "message": "Precondition failed"}})
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "wb") as f:
          f.write(body)
        os.replace(path + ".part", path)
        return self._json(200, self._object(query["name"], path, bucket.generation(path)))

    def do_DELETE(self):  # pylint: disable=invalid-name
      parts, query = self._request()
      path = os.path.join(bucket.root, parts[4], urllib.parse.unquote("/".join(parts[6:])))
      with bucket.lock:
        if not os.path.isfile(path):
          return self._json(404, {"error": {"code": 404, "message": "No such object"}})
        if self._failed(query, bucket.generation(path)):
          return self._json(412, {"error": {"code": 412, "message": "Precondition failed"}})
        os.remove(path)
        return self._reply(204)

  return Handler


@pytest.fixture(scope="module")
def fake_gcs(tmp_path_factory):
  """(root folder, _Bucket) with tensorstore, epath and Orbax's bucket query pointed at the fake."""
  root = str(tmp_path_factory.mktemp("gcs"))
  bucket = _Bucket(root)
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(bucket))
  threading.Thread(target=server.serve_forever, daemon=True).start()

  class FakeGcsFileSystem(DirFileSystem):
    protocol = ("gs", "gcs")
    cachable = False

    def __init__(self, *args, **kwargs):
      del args, kwargs
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))

  storage = types.ModuleType("google.cloud.storage")
  storage.Client = lambda *a, **k: types.SimpleNamespace(
      get_bucket=lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))
  try:
    cloud = importlib.import_module("google.cloud")
  except ImportError:
    cloud = types.ModuleType("google.cloud")
  gcs_utils = importlib.import_module("orbax.checkpoint._src.path.gcs_utils")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{server.server_port}")
    registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
    mp.setitem(registry, "gcs", FakeGcsFileSystem)
    mp.setattr(importlib.import_module("etils.epath.gpath"), "_is_tf_installed", lambda: False, raising=False)
    mp.setitem(sys.modules, "google.cloud", cloud)
    mp.setitem(sys.modules, "google.cloud.storage", storage)
    mp.setattr(cloud, "storage", storage, raising=False)
    type(epath.backend.fsspec_backend)._get_filesystem.cache_clear()  # pylint: disable=protected-access
    gcs_utils.get_bucket.cache_clear()
    yield root, bucket
    type(epath.backend.fsspec_backend)._get_filesystem.cache_clear()  # pylint: disable=protected-access
    gcs_utils.get_bucket.cache_clear()
  server.shutdown()


def _state(scale):
  return {"w": jnp.arange(12.0).reshape(3, 4) * scale, "step": jnp.asarray(scale, jnp.int32)}


def _uploads(bucket, needle):
  return [p for method, p in bucket.requests if method == "POST" and needle in p]


def test_save_restore_and_keep_through_a_gs_url(fake_gcs, tmp_path, monkeypatch):
  root, bucket = fake_gcs
  monkeypatch.chdir(tmp_path)  # a URL taken for a relative path would land here
  assert checkpoint_lib.check_storage("gs://ckpt-keep/run") is None
  ckpt = checkpoint_lib.Checkpointer("gs://ckpt-keep/run", every=2, keep=2)
  assert ckpt.directory == "gs://ckpt-keep/run/checkpoints"
  for step in range(1, 7):
    ckpt.save(step, _state(step), {"position": step}, {"config": {"steps": 6}})
  ckpt.close()
  assert sorted(os.listdir(os.path.join(root, "ckpt-keep", "run", "checkpoints"))) == ["4", "6"]  # keep=2
  assert _uploads(bucket, "/b/ckpt-keep/")  # the arrays went through tensorstore's GCS driver
  assert not os.listdir(tmp_path)
  again = checkpoint_lib.Checkpointer("gs://ckpt-keep/run", every=2, keep=2)
  try:
    step, state, data, meta = again.restore_latest(jax.eval_shape(lambda: _state(1)))
    assert again.latest_meta() == {"config": {"steps": 6}}
  finally:
    again.close()
  assert (step, data, meta) == (6, {"position": 6}, {"config": {"steps": 6}})
  np.testing.assert_array_equal(state["w"], np.arange(12.0).reshape(3, 4) * 6)


def test_unreadable_step_at_a_url_is_moved_aside(fake_gcs):
  root, _ = fake_gcs
  ckpt = checkpoint_lib.Checkpointer("gs://ckpt-damaged/run", every=1, keep=5)
  for step in (1, 2):
    ckpt.save(step, _state(step), {"position": step}, {})
  ckpt.close()
  state_dir = os.path.join(root, "ckpt-damaged", "run", "checkpoints", "2", "state")
  for folder, _, files in os.walk(state_dir):
    for f in files:
      if not f.startswith("_"):
        os.remove(os.path.join(folder, f))
  again = checkpoint_lib.Checkpointer("gs://ckpt-damaged/run", every=1, keep=5)
  try:
    step, state, _, _ = again.restore_latest(jax.eval_shape(lambda: _state(1)))
    assert again.all_steps() == [1]
  finally:
    again.close()
  assert step == int(state["step"]) == 1
  assert os.listdir(os.path.join(root, "ckpt-damaged", "run", "unreadable_checkpoints")) == ["2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("data_cache")


def _deterministic(records):
  return [{k: v for k, v in r.items() if "bytes" not in k and "per_s" not in k} for r in records]


def test_training_resumes_from_a_gs_url_on_another_machine(fake_gcs, cache, tmp_path, monkeypatch):
  """A run preempted after step 7 (whose save never finished) and resumed elsewhere (an empty local folder) ends
  exactly as the same run on a local path: checkpoints, tokenizer and metrics live at the URL."""
  root, bucket = fake_gcs
  local = str(tmp_path / "local_run")
  trainer.train(small_config(cache), local)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "machine_a"))
  url = "gs://train-run/lm"
  trainer.train(small_config(cache, plot=True), url, stop_at=7)
  run = os.path.join(root, "train-run", "lm")
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["3", "6", "7"]
  shutil.rmtree(os.path.join(run, "checkpoints", "7"))
  assert [r["step"] for r in _json_lines(os.path.join(run, "metrics", "metrics.jsonl"))] == list(range(1, 8))
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "machine_b"))
  record = trainer.train(small_config(cache, plot=True), url)
  assert record["step"] == 12
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["12", "3", "6", "9"]
  assert _deterministic(_json_lines(os.path.join(run, "metrics", "metrics.jsonl"))) == _deterministic(
      metrics_lib.read_metrics(local))
  with open(os.path.join(run, "tokenizer.json"), "rb") as a, open(os.path.join(local, "tokenizer.json"), "rb") as b:
    assert a.read() == b.read()
  assert os.path.exists(os.path.join(run, "plots", "loss.png"))
  assert os.path.exists(os.path.join(run, "tokenizer.trained_on.json"))
  assert checkpoint_lib.local_folder(url) == os.path.join(str(tmp_path / "machine_b"), "cce_jax_runs", "gs",
                                                          "train-run", "lm")
  assert _uploads(bucket, "/b/train-run/")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "machine_c"))  # finished: nothing to train, same record
  assert _deterministic([trainer.train(small_config(cache), url)]) == _deterministic([record])


def _json_lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def test_urls_that_cannot_work_are_one_line_config_errors(cache, monkeypatch):
  with pytest.raises(ConfigError, match=r"^--workdir=s3://b/run: checkpoints go to a path .* no other URL scheme"):
    trainer.train(small_config(cache), "s3://b/run")
  monkeypatch.setattr(checkpoint_lib, "_importable", lambda module: False)
  monkeypatch.setattr(checkpoint_lib, "_fsspec_knows", lambda protocol: False)
  message = checkpoint_lib.check_storage("gs://b/run")
  assert message == ("--workdir=gs://b/run: gs:// needs gcsfs and google-cloud-storage (pip install "
                     "'cce_jax[gcs]', or give a path such as a bucket mounted with gcsfuse)")
  assert checkpoint_lib.check_storage("/any/path") is None
