"""What PES needs from a task family, and the pieces every family shares.

A task is pure functions over arrays so that PES can vmap it over particles:
``init_params(key)`` draws fresh parameters, ``loss(params, key, data)`` is
the training loss on a batch drawn from ``key``. ``data`` holds arrays that
share a leading axis (examples, or tokens) and a window on it, ``lo`` and
``n``: a batch is drawn from rows [lo, lo + n) only. Families whose tasks have
the same ``fusion_key`` concatenate their arrays and keep one window each, so
they can train as one population (see ``fused``). Data is passed into the
jitted truncation as an argument, not closed over, so large datasets do not
become compile-time constants.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from recipes.metatrain.config import InnerConfig
from recipes.optim.config import OptimizerConfig
from recipes.optim.optimizers import build_optimizer


class Task:
    name: str
    init_loss: float  # the loss of a fresh model: meta-losses are divided by it
    data: dict  # arrays with a common leading axis, plus the window "lo", "n" (see whole_window)

    def fusion_key(self) -> tuple:
        """Equal keys: the same parameters, and the same loss given the same data."""
        raise NotImplementedError

    def init_params(self, key: jax.Array) -> dict:
        raise NotImplementedError

    def loss(self, params: dict, key: jax.Array, data: dict) -> jax.Array:
        raise NotImplementedError

    def abstract_params(self) -> dict:
        return jax.eval_shape(self.init_params, jax.random.key(0))


WINDOW_KEYS = ("lo", "n")


def whole_window(arrays: dict) -> dict:
    """Task data over all rows of ``arrays`` (which share their leading axis)."""
    rows = {int(a.shape[0]) for a in arrays.values()}
    if len(rows) != 1:
        raise ValueError(f"task data arrays must share their leading axis, got lengths {sorted(rows)}")
    return {**arrays, "lo": jnp.zeros((), jnp.int32), "n": jnp.asarray(rows.pop(), jnp.int32)}


def fuse_data(datas: list[dict]) -> tuple[dict, list[tuple[int, int]]]:
    """One set of arrays for several tasks of one fusion key, and each task's (lo, n) window in it."""
    keys = [sorted(k for k in d if k not in WINDOW_KEYS) for d in datas]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"fused tasks must have the same data arrays, got {keys}")
    parts, windows, start = [], [], 0
    for d in datas:
        lo, n = int(d["lo"]), int(d["n"])
        parts.append({k: d[k][lo: lo + n] for k in keys[0]})
        windows.append((start, n))
        start += n
    shared = {k: jnp.concatenate([part[k] for part in parts]) for k in keys[0]}
    return shared, windows


def inner_optimizer_config(inner: InnerConfig) -> OptimizerConfig:
    """The harness config every task trains with: Celo2 on hidden matrices, Adam on the rest."""
    return OptimizerConfig(
        name="celo2" if inner.orthogonalize else "celo2_base",
        lr=inner.lr, adamw_lr_mult=inner.adamw_lr_mult, b1=inner.b1, b2=inner.b2,
        weight_decay=inner.weight_decay, theta="normalized_momentum",  # unused: theta is passed in
        schedule={"kind": "constant"},
    )


def inner_optimizer(theta, task: Task, inner: InnerConfig) -> optax.GradientTransformation:
    """The harness's optimizer with ``theta`` (which may be traced) as Celo2's weights."""
    tx, _ = build_optimizer(inner_optimizer_config(inner), task.abstract_params(), theta=theta)
    return tx


def reparameterized_loss(task: Task, log_scale: jax.Array):
    """The task seen through params' = params / scale: same function, rescaled coordinates.

    The optimizer works on params', so a large scale shrinks its parameters and
    magnifies their gradients; a learned rule must cope with either.
    """
    scale = jnp.exp(log_scale)

    def loss(params_prime, key, data):
        return task.loss(jax.tree.map(lambda p: p * scale, params_prime), key, data)

    return loss

