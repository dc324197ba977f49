"""Flax NNX decoder language models that train with the fused loss (`cce_jax.models`)."""

from cce_jax.models.config import Config as Config
from cce_jax.models.loss import LOSS_IMPLEMENTATIONS as LOSS_IMPLEMENTATIONS
from cce_jax.models.loss import lm_loss as lm_loss
from cce_jax.models.model import Decoder as Decoder
from cce_jax.models.model import make_model as make_model
from cce_jax.models.model import param_counts as param_counts
from cce_jax.models.gguf_loader import load_gguf as load_gguf
