"""Installs `cce_jax`, mapping models/ and quant/ in as `cce_jax.models` and `cce_jax.quant`."""

import setuptools

setuptools.setup(
    name="cce_jax",
    version="0.1.0",
    description=(
        "Cut Cross-Entropy for JAX: the linear + softmax cross-entropy loss without materialising the"
        " logits, with scaling-law fitting and quantization tools."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=(
        setuptools.find_packages(include=["cce_jax", "cce_jax.*"])
        + ["cce_jax.models", "cce_jax.quant"]
    ),
    package_dir={"cce_jax.models": "models", "cce_jax.quant": "quant"},
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
        "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.90", "scipy>=1.13"],
        "plots": ["matplotlib>=3.8"],
    },
    license="Apache-2.0",
)
