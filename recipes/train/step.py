"""The jitted train and eval steps over the train state (recipes.train.state)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from model import constrain
from recipes.optim.diagnostics import optimizer_diagnostics


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
    a non-finite loss, gradient norm or update leaves params and optimizer state as they were
    (metrics["finite"] is False). ``labels`` (parameter -> branch name) adds per-branch
    update diagnostics as metrics["diagnostics"]; ``learning_rate`` (opt_state -> rate,
    recipes.optim.optimizers.learning_rate_reader over the optimizer's own schedule) adds metrics["lr"], the rate this step's
    update was taken with.
    """
    grads_of = accumulated_grads(loss_fn, micro_batches)

    def step(state, tokens_GxLp1):
        params, opt_state = state["params"], state["opt_state"]
        loss, grads = grads_of(params, tokens_GxLp1)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        # The update is checked too: a finite gradient can still give a non-finite update (a broken
        # theta, an overflow in the optimizer), and it must not reach the parameters.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        new_params, new_opt_state, updates = jax.lax.cond(
            finite, lambda: (optax.apply_updates(params, updates), new_opt_state, updates),
            lambda: (params, opt_state, jax.tree.map(jnp.zeros_like, updates)))
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
