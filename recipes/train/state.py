"""The train state: abstract (shapes and shardings, nothing allocated) and fresh.

The state is a plain dict, so orbax and optax see ordinary pytrees:
  params     the model's parameters as a nested dict of arrays (nnx.to_pure_dict)
  opt_state  the optax state
  step       int32 scalar, steps taken (skipped non-finite steps included)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from model import abstract_params, init_params
from model.config import ModelConfig


# The train state holds parameters as plain nested dicts; model.abstract_params and
# model.param_shardings give the same as nnx.State, hence the _dict names here.
def abstract_param_dict(config: ModelConfig):
    """(graphdef, the parameters as a nested dict of jax.ShapeDtypeStruct); allocates nothing."""
    graphdef, state = abstract_params(config)
    return graphdef, nnx.to_pure_dict(state)


def abstract_state(tx, abstract_params_tree: dict, shardings: dict) -> dict:
    """The train state as jax.ShapeDtypeStruct with shardings (for restore and memory estimates)."""
    shapes = {
        "params": abstract_params_tree,
        "opt_state": jax.eval_shape(tx.init, abstract_params_tree),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def init_state(config: ModelConfig, tx, seed: int, mesh: Mesh, shardings: dict) -> dict:
    """Fresh parameters and optimizer state, created already sharded."""
    _, params = init_params(config, seed=seed, mesh=mesh)
    params = nnx.to_pure_dict(params)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}
