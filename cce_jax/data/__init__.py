"""Data for the LM trainer: corpora, a locally trained BPE tokenizer, packed resumable batches."""

from cce_jax.data.errors import DataError as DataError
from cce_jax.data.pipeline import Batches as Batches
from cce_jax.data.pipeline import TokenisedCorpus as TokenisedCorpus
from cce_jax.data.pipeline import eval_batches as eval_batches
from cce_jax.data.pipeline import prepare as prepare
