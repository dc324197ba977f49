"""Bad input fails before anything runs, with a message that names the problem."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import cce_jax
import jax

from cce_jax import PallasGpuConfig
from cce_jax import XlaChunkedConfig

E = jnp.ones((4, 8))
C = jnp.ones((10, 8))
T = jnp.zeros((4,), jnp.int32)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((jnp.ones((4, 7)), C, T), {}, ValueError, r"hidden size D.*\(4, 7\).*\(10, 8\)"),
    ((E, C, jnp.zeros((5,), jnp.int32)), {}, ValueError, r"targets.shape.*\(4, 8\).*\(5,\)"),
    ((E, jnp.ones((10, 8, 1)), T), {}, ValueError, r"c must have shape \[V, D\]"),
    ((jnp.ones(()), C, T), {}, ValueError, "scalar"),
    ((E, C, jnp.zeros((4,), jnp.float32)), {}, TypeError, "targets must be an integer"),
    ((E, C, jnp.zeros((4,), bool)), {}, TypeError, "targets must be an integer"),
    ((E.astype(jnp.int32), C, T), {}, TypeError, "e must be a floating"),
    ((E, C, T), dict(bias=jnp.ones((9,))), ValueError, r"bias must have shape \[V\]"),
    ((E, C, T), dict(weights=jnp.ones((4, 1))), ValueError, "weights.shape"),
    ((E, C, T), dict(reduction="avg"), ValueError, "reduction must be one of"),
    ((E, C, T), dict(implementation="cuda"), ValueError, "implementation must be one of"),
    ((E, C, T), dict(implementation="pallas_tpu", interpret=True, config=XlaChunkedConfig(8, 8)), TypeError,
     "PallasTpuConfig"),
    ((E, C, T), dict(implementation="xla_chunked", interpret=True), ValueError, "interpret"),
    ((E, C, T), dict(interpret=1), TypeError, "interpret must be a bool"),
    ((E, C, T), dict(softcap=-1.0), ValueError, "softcap must be > 0"),
    ((E, C, T), dict(softcap=0.0), ValueError, "softcap must be > 0"),
    ((E, C, T), dict(softcap=jnp.float32(2.0)), TypeError, "softcap must be a Python float"),
    ((E, C, T), dict(label_smoothing=1.0), ValueError, "label_smoothing must be < 1"),
    ((E, C, T), dict(label_smoothing=-0.1), ValueError, "label_smoothing must be >= 0"),
    ((E, C, T), dict(z_loss=-1e-4), ValueError, "z_loss must be >= 0"),
    ((E, C, T), dict(shift=-1), ValueError, "shift must be >= 0"),
    ((E, C, T), dict(shift=1.5), TypeError, "shift must be an int"),
    ((E, C, T), dict(filter_eps="high"), ValueError, "filter_eps"),
    ((E, C, T), dict(filter_eps=-1.0), ValueError, "filter_eps must be >= 0"),
    ((E, C, T), dict(exact=True, filter_eps=1e-3), ValueError, "exact=True"),
    ((E, C, T), dict(label_smoothing=0.1, filter_eps=1e-3), NotImplementedError, "label_smoothing"),
    ((E, C, T), dict(implementation="xla_chunked", config=(8, 8)), TypeError, "XlaChunkedConfig"),
    ((E, C, T), dict(implementation="xla_chunked", config=PallasGpuConfig()), TypeError, "XlaChunkedConfig"),
    ((E, C, T), dict(interpret=True, config=XlaChunkedConfig(8, 8)), TypeError, "PallasGpuConfig"),
    ((E, C, T), dict(implementation="reference", config=XlaChunkedConfig(8, 8)), TypeError, "reference"),
    ((jnp.ones((8,)), C, jnp.zeros((), jnp.int32)), dict(shift=1), ValueError, "sequence axis"),
])
def test_linear_cross_entropy_rejects(args, kwargs, error, match):
  with pytest.raises(error, match=match):
    cce_jax.linear_cross_entropy(*args, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(softcap=-2.0), ValueError, "softcap"),
    (dict(return_entropy="yes"), TypeError, "return_entropy"),
])
def test_token_logprobs_rejects(kwargs, error, match):
  with pytest.raises(error, match=match):
    cce_jax.token_logprobs(E, C, T, **kwargs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the message on machines without a GPU")
def test_pallas_gpu_without_gpu_points_to_interpret():
  with pytest.raises(ValueError, match="interpret=True"):
    cce_jax.linear_cross_entropy(E, C, T, implementation="pallas_gpu")
