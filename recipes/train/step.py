"""The jitted train and eval steps over the train state (recipes.train.state)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from model import constrain
from model.sharding import logical_to_spec, spec_axes
from recipes.optim.diagnostics import optimizer_diagnostics


def compute_weights(params, dtype, shardings):
    """The weight matrices cast to the compute dtype where they are stored (each on its own shards),
    so that FSDP gathers them at that width; vectors (biases, LayerNorm) stay float32."""
    def cast(p, sharding):
        if p.ndim < 2 or p.dtype == dtype:
            return p
        return jax.lax.with_sharding_constraint(p.astype(dtype), sharding)
    return jax.tree.map(cast, params, shardings)


def _data_shards() -> int:
    """How many ways the 'data' axis of the mesh the step is traced under (jax.set_mesh) splits the
    batch: 1 without such a mesh, or where the batch's sharding rule leaves 'data' out."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in spec_axes(logical_to_spec(("batch",), mesh=mesh)[0]):
        return 1
    return mesh.shape["data"]


def gathered(shardings):
    """The shardings with the FSDP axis dropped: the weights whole on every FSDP shard."""
    def keep(axes):
        kept = tuple(a for a in spec_axes(axes) if a != "fsdp")
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return jax.tree.map(lambda sh: NamedSharding(sh.mesh, PartitionSpec(*map(keep, sh.spec))), shardings)


def accumulated_grads(loss_fn, micro_batches: int, *, compute_dtype=None, param_shardings=None,
                      gather_once: bool = False):
    """fn(params, tokens_GxLp1) -> (mean loss, mean gradients) over micro_batches micro-batches.

    Micro-batch a holds rows a, a + A, a + 2A, ... (of each data shard's rows, where the mesh's
    'data' axis splits the batch) so each stays spread over every batch shard; their gradients are summed in a
    lax.scan, so only one micro-batch's activations are alive at a time, and averaged over the data
    shards once, after the scan. With ``compute_dtype`` and ``param_shardings`` the weight matrices are
    cast before use (compute_weights); ``gather_once`` gathers that copy once, before the
    micro-batches, and reduce-scatters each micro-batch's gradients back to the parameters' layout.
    """
    cast = compute_dtype is not None and param_shardings is not None
    gather_once = gather_once and cast

    def micro_grads(params, weights, tokens_MxLp1):
        tokens_MxLp1 = constrain(tokens_MxLp1, ("batch", None))
        if gather_once:  # gradients of the gathered copy, reduce-scattered to the parameters' layout
            loss, grads = jax.value_and_grad(loss_fn)(weights, tokens_MxLp1)
            return loss, jax.tree.map(lambda g, p, sh: jax.lax.with_sharding_constraint(g, sh).astype(p.dtype),
                                      grads, params, param_shardings)
        weights_of = (lambda p: compute_weights(p, compute_dtype, param_shardings)) if cast else (lambda p: p)
        return jax.value_and_grad(lambda p: loss_fn(weights_of(p), tokens_MxLp1))(params)

    def grads_of(params, tokens_GxLp1):
        weights = None
        if gather_once:
            weights = compute_weights(params, compute_dtype, param_shardings)
            weights = jax.tree.map(jax.lax.with_sharding_constraint, weights, gathered(param_shardings))
        if micro_batches == 1:
            return micro_grads(params, weights, tokens_GxLp1)
        if _data_shards() > 1:
            # Each data shard sums its own rows' gradients over the micro-batches, and the shards'
            # means are averaged once a step: not an all-reduce over 'data' per micro-batch.
            def shard_mean(params, weights, tokens_GxLp1):
                return jax.lax.pmean(scanned(params, weights, tokens_GxLp1), "data")
            # check_vma=False: the scan's zero carry is the same on every data shard and the gradients
            # added to it differ, which the per-axis type check would refuse.
            return jax.shard_map(shard_mean, in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec("data")),
                                 out_specs=PartitionSpec(), axis_names={"data"},
                                 check_vma=False)(params, weights, tokens_GxLp1)
        return scanned(params, weights, tokens_GxLp1)

    def scanned(params, weights, tokens_GxLp1):
        rows, width = tokens_GxLp1.shape
        tokens_AxMxLp1 = tokens_GxLp1.reshape(rows // micro_batches, micro_batches, width).swapaxes(0, 1)

        def micro(carry, tokens_MxLp1):
            return jax.tree.map(jnp.add, carry, micro_grads(params, weights, tokens_MxLp1)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(micro, zeros, tokens_AxMxLp1)
        return jax.tree.map(lambda x: x / micro_batches, (loss, grads))

    return grads_of


def make_train_step(loss_fn, tx, *, micro_batches: int, shardings: dict, batch_sharding, labels=None,
                    learning_rate=None, compute_dtype=None, gather_once: bool = False):
    """jit(step(state, tokens_GxLp1) -> (state, metrics)), the state donated.

    Gradients are averaged over micro_batches micro-batches (accumulated_grads). A step with
    a non-finite loss, gradient norm or update leaves params and optimizer state as they were
    (metrics["finite"] is False). ``labels`` (parameter -> branch name) adds per-branch
    update diagnostics as metrics["diagnostics"]; ``compute_dtype`` casts the weight matrices before
    they are gathered and ``gather_once`` gathers them once a step (accumulated_grads); ``learning_rate`` (opt_state -> rate,
    recipes.optim.optimizers.learning_rate_reader over the optimizer's own schedule) adds metrics["lr"], the rate this step's
    update was taken with.
    """
    grads_of = accumulated_grads(loss_fn, micro_batches, compute_dtype=compute_dtype,
                                 param_shardings=shardings["params"], gather_once=gather_once)

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
