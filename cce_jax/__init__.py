"""cce_jax: Cut Cross-Entropy and large-vocabulary language-model tools for JAX."""

from cce_jax.ops.linear_cross_entropy import linear_cross_entropy as linear_cross_entropy
from cce_jax.ops.linear_cross_entropy import token_logprobs as token_logprobs
from cce_jax.ops.linear_cross_entropy import PallasGpuConfig as PallasGpuConfig
from cce_jax.ops.linear_cross_entropy import PallasTpuConfig as PallasTpuConfig
from cce_jax.ops.linear_cross_entropy import XlaChunkedConfig as XlaChunkedConfig
from cce_jax.ops.linear_cross_entropy import sharded as sharded

__version__ = "0.1.0"
