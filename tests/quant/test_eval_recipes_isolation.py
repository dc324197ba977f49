"""`eval_recipes.compare` quantizes a copy per recipe: the source model's Params are never written, so a recipe's
row does not depend on the rows before it."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from cce_jax import models
from cce_jax.quant import eval_recipes

CFG = models.Config(V=64, D=64, H=4, KV=4, L=2, F=128, T=32, dtype="float32", init_std=0.15)


def test_rows_do_not_depend_on_earlier_recipes():
  model = models.make_model(CFG, 0)
  before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  tokens = np.random.default_rng(3).integers(0, CFG.V, 4 * 32 + 1).astype(np.int32)
  both = eval_recipes.compare(model, tokens, ["int4_g128", "int8"], seq_len=32)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, after))
  alone = eval_recipes.compare(model, tokens, ["int8"], seq_len=32)
  assert both[2]["recipe"] == alone[1]["recipe"] == "int8"
  assert both[2]["perplexity"] == alone[1]["perplexity"] and both[2]["kl"] == alone[1]["kl"]
  assert both[1]["kl"] > both[2]["kl"]  # int4 is farther from full precision than int8
