"""Installs `cce_jax`, mapping models/ and quant/ in as `cce_jax.models` and `cce_jax.quant`.

The version is read from `cce_jax/__init__.py` (`__version__`), its one home, without importing the package.
The scaling data sets in `cce_jax/scaling/data/` (CSVs, licences, provenance notes) ship as package data.
"""

import pathlib
import re

import setuptools

ROOT = pathlib.Path(__file__).resolve().parent


def _version():
  text = (ROOT / "cce_jax" / "__init__.py").read_text(encoding="utf-8")
  match = re.search(r"""^__version__ = ["']([^"']+)["']$""", text, flags=re.M)
  if match is None:
    raise RuntimeError("cce_jax/__init__.py has no __version__ = \"...\" line")
  return match.group(1)


def _mapped(folder, name):
  """`name` and its sub-packages, found under `folder` (mapped through package_dir)."""
  return [name] + [f"{name}.{p}" for p in setuptools.find_packages(where=folder)]


setuptools.setup(
    name="cce_jax",
    version=_version(),
    description=(
        "Cut Cross-Entropy for JAX: the linear + softmax cross-entropy loss without materialising the"
        " logits, with scaling-law fitting and quantization tools."
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=(
        setuptools.find_packages(include=["cce_jax", "cce_jax.*"])
        + _mapped("models", "cce_jax.models")
        + _mapped("quant", "cce_jax.quant")
    ),
    package_dir={"cce_jax.models": "models", "cce_jax.quant": "quant"},
    package_data={"cce_jax.scaling": ["data/*.md", "data/*/*", "data/*/*/*"]},
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "absl-py>=2.0",
        "numpy>=2.0",
        "ml_collections>=1.0",
        "jaxtyping>=0.2.36",
        "tokenizers>=0.20",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.90", "scipy>=1.13", "matplotlib>=3.8"],
        "plots": ["matplotlib>=3.8"],
        "gguf": ["gguf>=0.17"],
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14"],
    },
    license="Apache-2.0",
)
