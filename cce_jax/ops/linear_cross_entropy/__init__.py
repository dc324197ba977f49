"""The fused linear + cross-entropy op (Cut Cross-Entropy) and its companion per-token log-probabilities."""

from cce_jax.ops.linear_cross_entropy.api import linear_cross_entropy as linear_cross_entropy
from cce_jax.ops.linear_cross_entropy.api import token_logprobs as token_logprobs
from cce_jax.ops.linear_cross_entropy.config import PallasGpuConfig as PallasGpuConfig
from cce_jax.ops.linear_cross_entropy.config import XlaChunkedConfig as XlaChunkedConfig
from cce_jax.ops.linear_cross_entropy.tpu_config import PallasTpuConfig as PallasTpuConfig
