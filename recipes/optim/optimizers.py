"""The optimizer harness: one config -> one optax.GradientTransformation.

Parameters are split by recipes.optim.routing into labelled branches and run
through optax.partition:

  celo2:      hidden matrices  scale_by_celo2(orthogonalize=True) -> decay -> -lr
  muon:       hidden matrices  optax.contrib.muon (decay and lr inside)
  adamw:      embeddings, biases, LayerNorm (and everything for the adamw baseline)
  celo2_base: every parameter  scale_by_celo2(orthogonalize=False) -> decay -> -lr

Weight decay is decoupled in every branch: update = -lr_t * (step + wd * p).
Global gradient-norm clipping comes before the partition. Gradient accumulation is
the train step's (data.micro_batch), so every update the harness sees is a whole step's.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax

from recipes.optim.celo2 import scale_by_celo2
from recipes.optim.theta import resolve_theta
from recipes.optim.config import OptimizerConfig
from recipes.optim.routing import Route, RoutingTable, TableRow, is_embedding, map_routes, param_path, route, route_tree
from recipes.optim.schedules import make_schedule

SINGLE_BRANCH = ("adamw", "celo2_base")  # baselines that send every parameter through one rule


def branch_of(name: str, route: Route) -> str:
    """The optax.partition label of a routed parameter under optimizer ``name``."""
    if name in SINGLE_BRANCH:
        return name
    return name if route.group == "main" else "adamw"


def param_labels(config: OptimizerConfig, tree):
    """A tree shaped like ``tree`` holding each parameter's branch name (for diagnostics too)."""
    return map_routes(lambda r: branch_of(config.name, r), tree, config.routing)


def peak_rates(config: OptimizerConfig, tree, lr, side_lr):
    """A tree shaped like ``tree`` holding each parameter's peak rate: ``side_lr`` on the AdamW side of
    celo2 and muon, ``lr`` elsewhere. A harness built at lr 1 (adamw_lr_mult 1) whose updates are
    multiplied by these takes the steps of one built at these peaks, since every branch steps by
    -peak * shape(t) * (direction + weight decay): with traced peaks one compiled program serves a
    whole learning-rate grid."""
    side = None if config.name in SINGLE_BRANCH else "adamw"
    return map_routes(lambda r: side_lr if branch_of(config.name, r) == side else lr, tree, config.routing)


def decays(config: OptimizerConfig, route: Route) -> bool:
    return config.decay_rank1 or route.logical_rank > 1


def learning_rate_schedules(config: OptimizerConfig, total_steps: int | None = None) -> dict[str, optax.Schedule]:
    """Branch name -> step -> LR. One schedule shape, two peaks: lr and the AdamW side LR."""
    main = make_schedule(config.schedule, config.lr, total_steps)
    if config.name in SINGLE_BRANCH:
        return {config.name: main}
    return {config.name: main, "adamw": make_schedule(config.schedule, config.side_lr, total_steps)}


def update_count(opt_state) -> jax.Array:
    """How many updates the harness has applied, read from its own state: the count of its
    learning-rate scaling, which stands still on skipped steps (the train state's step
    counter does not). Every branch's count advances together."""
    counts = [
        value
        for path, value in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
        if getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"
    ]
    if not counts:
        raise ValueError("no learning-rate schedule state found: pass the state of build_optimizer's transformation")
    return counts[0]


def learning_rate_reader(schedule: optax.Schedule):
    """opt_state -> ``schedule`` (the main branch's, as built for the optimizer) at the next
    update (``update_count``): the rate the optimizer actually applies, for logging."""
    return lambda opt_state: schedule(update_count(opt_state))


def _check_routes(config: OptimizerConfig, routes: list[Route]) -> None:
    """Muon orthogonalizes matrices: refuse embeddings and vectors in its branch."""
    if config.name != "muon":
        return
    for r in routes:
        if r.group != "main":
            continue
        if is_embedding(r.path, config.routing):
            raise ValueError(
                f"{r.path} is an embedding but {r.reason} sends it to Muon; embeddings must use "
                "AdamW: narrow that rule or fix routing.embedding_pattern"
            )
        if r.logical_rank < 2:
            raise ValueError(
                f"{r.path} {r.shape} has logical rank {r.logical_rank} but {r.reason} sends it to Muon, "
                "which orthogonalizes matrices only: route it to 'adamw'"
            )


def _celo2_batch_axes(config: OptimizerConfig):
    """Stacked layers are batch axes, so celo2 sees a stacked bias as a batch of vectors."""
    return lambda keypath, shape: route(param_path(keypath), tuple(shape), config.routing).batch_axes


def _decay_mask(config: OptimizerConfig):
    return lambda tree: map_routes(lambda r: decays(config, r), tree, config.routing)


def _celo2_branch(config, theta, schedule, orthogonalize: bool) -> optax.GradientTransformation:
    return optax.chain(
        scale_by_celo2(theta, orthogonalize=orthogonalize, batch_axes=_celo2_batch_axes(config)),
        optax.add_decayed_weights(config.weight_decay, _decay_mask(config)),
        optax.scale_by_learning_rate(schedule),
    )


def _muon_branch(config, schedule) -> optax.GradientTransformation:
    def dimension_numbers(tree):
        # The last two axes are (fan_in, fan_out); every leading axis (the layer axis
        # of stacked weights) is a batch axis, so each layer is orthogonalized alone.
        return jax.tree.map(
            lambda x: optax.contrib.MuonDimensionNumbers(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1), tree
        )

    muon = config.muon
    return optax.contrib.muon(
        learning_rate=schedule,
        ns_steps=muon.ns_steps,
        beta=muon.beta,
        nesterov=muon.nesterov,
        consistent_rms=muon.consistent_rms,
        weight_decay=config.weight_decay,
        weight_decay_mask=_decay_mask(config),
        muon_weight_dimension_numbers=dimension_numbers,
    )


def _adamw_branch(config, schedule) -> optax.GradientTransformation:
    return optax.adamw(
        schedule, b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mask=_decay_mask(config),
    )


def _branches(config: OptimizerConfig, theta, schedules) -> dict[str, optax.GradientTransformation]:
    name = config.name
    branches = {}
    if name in ("celo2", "celo2_base"):
        branches[name] = _celo2_branch(config, theta, schedules[name], orthogonalize=name == "celo2")
    elif name == "muon":
        branches[name] = _muon_branch(config, schedules[name])
    if "adamw" in schedules:
        branches["adamw"] = _adamw_branch(config, schedules["adamw"])
    return branches


def _state_bytes(tx: optax.GradientTransformation, params) -> list[int]:
    """Optimizer-state bytes each parameter adds (shared counters excluded), without allocating."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def only(i):  # the tree with every leaf but the i-th masked out
        return treedef.unflatten([leaf if j == i else optax.MaskedNode() for j, leaf in enumerate(leaves)])

    def nbytes(i) -> int:
        state = jax.eval_shape(tx.init, only(i))
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))

    base = nbytes(-1)
    return [nbytes(i) - base for i in range(len(leaves))]


def _rule(name: str, route: Route) -> str:
    # Baselines ignore the routing group; the table still shows it for comparison with celo2/muon.
    return f"{name} baseline: all ({route.group} by {route.reason})" if name in SINGLE_BRANCH else route.reason


def build_optimizer(
    config: OptimizerConfig,
    params,
    theta=None,
    *,
    total_steps: int | None = None,
    schedules: dict[str, optax.Schedule] | None = None,
) -> tuple[optax.GradientTransformation, RoutingTable]:
    """The harness's transformation and its routing table.

    Args:
      config: the optimizer config.
      params: the parameter tree (arrays, jax.ShapeDtypeStruct or nnx.State);
        only paths and shapes are read, so abstract parameters suffice.
      theta: Celo2's weights; None loads ``config.theta`` (celo2 and celo2_base only).
      total_steps: the run length, used when ``config.schedule.total_steps`` is None.
      schedules: learning_rate_schedules(config, total_steps), when the caller built them
        already (to log the rate the optimizer applies).
    """
    if not isinstance(config, OptimizerConfig):
        raise TypeError(f"build_optimizer needs an OptimizerConfig, got {type(config).__name__}")
    routes = route_tree(params, config.routing)
    _check_routes(config, routes)
    if config.name in ("celo2", "celo2_base") and theta is None:
        theta = resolve_theta(config.theta, config.theta_seed, setting="optimizer.theta")
    schedules = schedules or learning_rate_schedules(config, total_steps)
    branches = _branches(config, theta, schedules)
    # Labels come from paths and shapes, so one function serves params, grads and abstract trees.
    tx = optax.partition(branches, lambda tree: param_labels(config, tree))
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)

    state_bytes = _state_bytes(tx, params)
    rows = tuple(
        TableRow(r.path, r.shape, r.logical_rank, branch_of(config.name, r), decays(config, r),
                 math.prod(r.shape), nbytes, _rule(config.name, r))
        for r, nbytes in zip(routes, state_bytes)
    )
    return tx, RoutingTable(config.name, rows)
