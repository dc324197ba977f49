"""The jitted train and eval steps over a device mesh, and the initial train state, for one model config.

Mesh axis "data" over all devices: the batch is split over it; parameters are replicated, or with fsdp=True each is
split along its largest dimension that the device count divides. State = {"params": flat dict, "opt_state",
"step"}; the train step donates it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cce_jax import models
from cce_jax.training import optim
from cce_jax.training.loss_keywords import DEFAULT_LOSS_GRADIENT
from cce_jax.training.loss_keywords import lm_loss_keywords
from cce_jax.training.params import ParamCodec


@dataclasses.dataclass
class Steps:
  codec: ParamCodec
  state: dict  # the initial state, or its ShapeDtypeStructs (with shardings) when built with init=False
  init_state: object  # () -> the initial state, placed with its shardings
  train_step: object  # (state, batch) -> (state, metrics); donates state
  eval_step: object  # (params, batch) -> (mean loss, token count)
  batch_sharding: NamedSharding


def _param_spec(shape, n_devices, fsdp):
  if not fsdp or n_devices == 1:
    return P()
  for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[i] % n_devices == 0:
      return P(*([None] * i + ["data"]))
  return P()


def build(mcfg: models.Config, ocfg: optim.OptimConfig, *, loss: str, loss_gradient: str = DEFAULT_LOSS_GRADIENT,
          fsdp: bool = False, seed: int = 0, init: bool = True) -> Steps:
  """The steps and (if init) the initial state; with init=False `state` holds ShapeDtypeStructs only.

  loss, loss_gradient: the loss implementation and the fused loss's gradient mode (`loss_keywords`)."""
  loss_keywords = lm_loss_keywords(loss, loss_gradient)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  codec = ParamCodec(nnx.eval_shape(lambda: models.make_model(mcfg, seed)))
  make_params = lambda: codec.to_dict(models.make_model(mcfg, seed))
  abstract = jax.eval_shape(make_params)
  param_shardings = {k: NamedSharding(mesh, _param_spec(v.shape, mesh.size, fsdp)) for k, v in abstract.items()}
  tx = optim.make_optimizer(ocfg)
  lr = optim.learning_rate(ocfg)

  def init_state():
    params = jax.lax.with_sharding_constraint(make_params(), param_shardings)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  # Optimizer moments follow their parameters' sharding; scalars (counts, the step) are replicated.
  state_shapes = jax.eval_shape(init_state)
  state_shardings = {"params": param_shardings, "opt_state": _opt_shardings(state_shapes["opt_state"],
                                                                            param_shardings, replicated),
                     "step": replicated}
  init_placed = jax.jit(init_state, out_shardings=state_shardings)
  if init:
    state = init_placed()
  else:
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes,
                         state_shardings)

  def loss_fn(params, batch):
    return models.lm_loss(codec.to_model(params), batch["inputs"], batch["targets"], mesh=mesh, **loss_keywords)

  def train_step(state, batch):
    (loss_value, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
           "step": state["step"] + 1}
    return new, {"loss": loss_value, "grad_norm": optax.tree.norm(grads), "tokens": count,
                 "lr": lr(state["step"])}

  train_step = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, None), donate_argnums=0)
  eval_step = jax.jit(loss_fn, in_shardings=(param_shardings, batch_sharding))
  return Steps(codec, state, init_placed, train_step, eval_step, batch_sharding)


def _opt_shardings(opt_shapes, param_shardings, replicated):
  """Any sub-tree of the optimizer state shaped like the parameter dict gets their shardings."""
  keys = set(param_shardings)

  def visit(node):
    if isinstance(node, dict) and set(node) == keys:
      return dict(param_shardings)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax's NamedTuple states
      return type(node)(*(visit(v) for v in node))
    if isinstance(node, (tuple, list)):
      return type(node)(visit(v) for v in node)
    return replicated

  return visit(opt_shapes)
