"""The train state, its shardings, and the jitted train and eval steps.

The state is a plain dict, so orbax and optax see ordinary pytrees:
  params     the model's parameters as a nested dict of arrays (nnx.to_pure_dict)
  opt_state  the optax state
  step       int32 scalar, steps taken (skipped non-finite steps included)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import abstract_params, constrain, init_params, param_shardings
from model.config import ModelConfig
from recipes.optim.diagnostics import optimizer_diagnostics


# The train state holds parameters as plain nested dicts; model.abstract_params and
# model.param_shardings give the same as nnx.State, hence the _dict names here.
def abstract_param_dict(config: ModelConfig):
    """(graphdef, the parameters as a nested dict of jax.ShapeDtypeStruct); allocates nothing."""
    graphdef, state = abstract_params(config)
    return graphdef, nnx.to_pure_dict(state)


def param_sharding_dict(config: ModelConfig, mesh: Mesh) -> dict:
    """The parameters' NamedShardings on ``mesh`` as a nested dict shaped like the state's params."""
    _, state = abstract_params(config)
    return nnx.to_pure_dict(param_shardings(state, mesh))


def state_shardings(tx: optax.GradientTransformation, abstract_params_tree: dict, param_sh: dict,
                    mesh: Mesh) -> dict:
    """Shardings of the whole train state. The optimizer state's follow from compiling tx.init
    on sharded parameters (moments take their parameter's layout), which allocates nothing."""
    sharded = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           abstract_params_tree, param_sh)
    replicated = NamedSharding(mesh, PartitionSpec())
    mesh_devices = set(mesh.devices.flat)

    def on_mesh(sharding):  # constants (step counters) come back on one device: replicate them
        if sharding.device_set != mesh_devices or sharding.is_fully_replicated:
            return replicated
        return sharding

    opt_sh = jax.tree.map(on_mesh, jax.jit(tx.init).lower(sharded).compile().output_shardings)
    return {"params": param_sh, "opt_state": opt_sh, "step": replicated}


def abstract_state(tx, abstract_params_tree: dict, shardings: dict) -> dict:
    """The train state as jax.ShapeDtypeStruct with shardings (for restore and memory estimates)."""
    shapes = {
        "params": abstract_params_tree,
        "opt_state": jax.eval_shape(tx.init, abstract_params_tree),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def bytes_per_device(tree) -> int:
    """Largest per-device bytes of an abstract tree with shardings (shards may be uneven)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def init_state(config: ModelConfig, tx, seed: int, mesh: Mesh, shardings: dict) -> dict:
    """Fresh parameters and optimizer state, created already sharded."""
    _, params = init_params(config, seed=seed, mesh=mesh)
    params = nnx.to_pure_dict(params)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}


def accumulated_grads(loss_fn, micro_batches: int):
    """fn(params, tokens_GxLp1) -> (mean loss, mean gradients) over micro_batches micro-batches.

    Micro-batch a holds rows a, a + A, a + 2A, ... so each stays spread over every batch
    shard; their gradients are summed in a lax.scan, so only one micro-batch's activations
    are alive at a time.
    """
    def grads_of(params, tokens_GxLp1):
        if micro_batches == 1:
            return jax.value_and_grad(loss_fn)(params, constrain(tokens_GxLp1, ("batch", None)))
        rows, width = tokens_GxLp1.shape
        tokens_AxMxLp1 = tokens_GxLp1.reshape(rows // micro_batches, micro_batches, width).swapaxes(0, 1)

        def micro(carry, tokens_MxLp1):
            loss, grads = jax.value_and_grad(loss_fn)(params, constrain(tokens_MxLp1, ("batch", None)))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(micro, zeros, tokens_AxMxLp1)
        return jax.tree.map(lambda x: x / micro_batches, (loss, grads))

    return grads_of


def make_train_step(loss_fn, tx, *, micro_batches: int, shardings: dict, batch_sharding, labels=None,
                    learning_rate=None):
    """jit(step(state, tokens_GxLp1) -> (state, metrics)), the state donated.

    Gradients are averaged over micro_batches micro-batches (accumulated_grads). A step with
    a non-finite loss or gradient norm leaves params and optimizer state as they were
    (metrics["finite"] is False). ``labels`` (parameter -> branch name) adds per-branch
    update diagnostics as metrics["diagnostics"]; ``learning_rate`` (opt_state -> rate,
    recipes.optim.optimizers.learning_rate_reader) adds metrics["lr"], the rate this step's
    update was taken with.
    """
    grads_of = accumulated_grads(loss_fn, micro_batches)

    def step(state, tokens_GxLp1):
        params, opt_state = state["params"], state["opt_state"]
        loss, grads = grads_of(params, tokens_GxLp1)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, new_opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state, updates

        def skip(_):
            return params, opt_state, jax.tree.map(jnp.zeros_like, params)

        new_params, new_opt_state, updates = jax.lax.cond(finite, apply, skip, None)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        if learning_rate is not None:
            metrics["lr"] = learning_rate(opt_state)
        if labels is not None:
            metrics["diagnostics"] = optimizer_diagnostics(grads, updates, params, labels)
        new_state = {"params": new_params, "opt_state": new_opt_state, "step": state["step"] + 1}
        return new_state, metrics

    return jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=(0,))


def make_eval_step(loss_fn, param_sh: dict, batch_sharding):
    """jit(loss(params, tokens_BxLp1)): mean next-token loss of one validation batch."""
    def loss(params, tokens_BxLp1):
        return loss_fn(params, constrain(tokens_BxLp1, ("batch", None)))
    return jax.jit(loss, in_shardings=(param_sh, batch_sharding))
