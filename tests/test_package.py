"""The installed package: its public names, the mapped sub-packages, one version string, every package folder
and data file in the wheel (checked from the sources here; .ci/check_wheel.py checks the built wheel)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import pathlib
import re


def test_public_surface():
  import cce_jax

  for name in ("linear_cross_entropy", "token_logprobs", "XlaChunkedConfig"):
    assert callable(getattr(cce_jax, name)), name


def test_models_and_quant_are_mapped_in():
  for name in ("cce_jax.models", "cce_jax.quant"):
    module = importlib.import_module(name)
    assert module.__doc__, name


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_one_version_string():
  import cce_jax

  # setup.py reads cce_jax.__version__; the installed metadata carries the same string.
  assert importlib.metadata.version("cce_jax") == cce_jax.__version__
  setup = (ROOT / "setup.py").read_text(encoding="utf-8")
  assert not re.search(r"""version\s*=\s*["']""", setup), "setup.py must not spell the version out"
  assert "[project]" not in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_every_package_folder_has_an_init():
  # find_packages skips a folder without __init__.py, so a wheel would lack it (an editable install hides this).
  for top in ("cce_jax", "models", "quant"):
    for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
      if any(folder.glob("*.py")):
        assert (folder / "__init__.py").is_file(), f"{folder.relative_to(ROOT)} has modules but no __init__.py"


def test_package_data_globs_cover_the_scaling_data():
  setup = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
  package_data = next(ast.literal_eval(k.value) for node in ast.walk(setup) if isinstance(node, ast.Call)
                      for k in node.keywords if k.arg == "package_data")
  globs = package_data["cce_jax.scaling"]
  base = ROOT / "cce_jax" / "scaling"
  files = [p for p in (base / "data").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
  assert len(files) > 40
  for path in files:
    relative = path.relative_to(base)
    assert any(relative.match(g) and len(relative.parts) == len(pathlib.PurePath(g).parts) for g in globs), relative


def test_wheel_check_script_passes_on_this_install():
  # .ci/check_wheel.py runs in CI against the installed wheel; here its import and data checks run on this install.
  spec = importlib.util.spec_from_file_location("check_wheel", ROOT / ".ci" / "check_wheel.py")
  check_wheel = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check_wheel)
  problems = []
  names = check_wheel.check_imports(problems)
  check_wheel.check_data(problems)
  assert not problems, "\n".join(problems)
  assert set(check_wheel.REQUIRED) <= set(names)
  assert "cce_jax.scaling.reproduce.porian" in names and "cce_jax.training.trainer" in names
