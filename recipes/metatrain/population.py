"""A task family's PES population: inner training with Celo2, resets, meta-loss.

Each particle trains one sampled instance of the task: fresh parameters, a
random global reparameterization scale, and a length log-uniform in
[min_length, max_length]. A particle whose length is used up is reset at the
start of the next truncation, so lengths are in effect rounded up to whole
truncations. The first lengths start at a random offset so that the
particles reset at different outer steps.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from recipes.optim.theta import normalized_momentum_theta
from recipes.metatrain.config import InnerConfig, PESConfig
from recipes.metatrain.pes import PESState, init_pes_state
from recipes.metatrain.tasks.base import Task, inner_optimizer, reparameterized_loss


UNSEEN_BATCHES = 4  # batches averaged by the final_unseen_loss objective: one alone is too noisy for PES


class InnerState(NamedTuple):
    params: Any  # in the reparameterized coordinates params / scale
    opt_state: Any
    step: jax.Array  # inner steps taken since the last reset
    length: jax.Array  # this inner problem's length
    log_scale: jax.Array
    last_loss: jax.Array  # mean raw training loss of the latest truncation (for logging)


class Population:
    def __init__(self, task: Task, pes: PESConfig, inner: InnerConfig):
        self.task, self.pes, self.inner = task, pes, inner
        self._init_tx = inner_optimizer(jax.tree.map(jnp.asarray, normalized_momentum_theta()), task, inner)

    @property
    def pairs(self) -> int:
        return self.pes.particles // 2

    def normalized(self, loss: jax.Array) -> jax.Array:
        """loss / the task's initial loss, clipped at the cap; NaN counts as the cap."""
        value = loss / self.task.init_loss
        return jnp.where(jnp.isnan(value), self.pes.loss_cap, jnp.minimum(value, self.pes.loss_cap))

    def fresh(self, key: jax.Array) -> InnerState:
        """A new inner problem at step 0."""
        k_params, k_length, k_scale = jax.random.split(key, 3)
        lo, hi = math.log(self.pes.min_length), math.log(self.pes.max_length)
        length = jnp.floor(jnp.exp(jax.random.uniform(k_length, (), minval=lo, maxval=hi + 1e-6)))
        length = jnp.clip(length, self.pes.min_length, self.pes.max_length).astype(jnp.int32)
        log_scale = jax.random.uniform(k_scale, (), minval=math.log(self.inner.scale_min),
                                       maxval=math.log(self.inner.scale_max))
        params = jax.tree.map(lambda p: p / jnp.exp(log_scale), self.task.init_params(k_params))
        return InnerState(params, self._init_tx.init(params), jnp.zeros((), jnp.int32), length,
                          log_scale, jnp.full((), jnp.nan, jnp.float32))

    def maybe_reset(self, inner: InnerState, key: jax.Array):
        done = inner.step >= inner.length
        new = self.fresh(key)
        return jax.tree.map(lambda a, b: jnp.where(done, a, b), new, inner), done

    def unroll(self, theta, inner: InnerState, key: jax.Array, data, *, rule: bool = True):
        """``truncation`` inner steps with Celo2(theta); returns (state, meta-loss): by ``pes.objective``,
        the mean normalized training loss of the steps, or the final parameters' normalized loss on
        unseen batches.

        ``rule=False`` replaces the optimizer by plain SGD: the same forward and
        backward passes without the learned rule, to time the two apart.
        """
        tx = inner_optimizer(theta, self.task, self.inner) if rule else optax.sgd(self.inner.lr)
        loss_fn = reparameterized_loss(self.task, inner.log_scale)
        opt_state = inner.opt_state if rule else tx.init(inner.params)

        def step(carry, t):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, t), data)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, new_opt), losses = jax.lax.scan(step, (inner.params, opt_state), jnp.arange(self.pes.truncation))
        if not rule:
            new_opt = inner.opt_state
        new = InnerState(params, new_opt, inner.step + self.pes.truncation, inner.length, inner.log_scale,
                         jnp.mean(losses))
        if self.pes.objective == "final_unseen_loss":
            return new, jnp.mean(self.normalized(self.unseen_losses(loss_fn, params, key, data)))
        return new, jnp.mean(self.normalized(losses))

    def unseen_losses(self, loss_fn, params, key: jax.Array, data) -> jax.Array:
        """Losses of the truncation's final parameters on batches none of its steps trained on:
        the batch keys continue past the ones the steps used (``fold_in(key, t)``, t < truncation)."""
        keys = jnp.arange(self.pes.truncation, self.pes.truncation + UNSEEN_BATCHES)
        return jax.vmap(lambda t: loss_fn(params, jax.random.fold_in(key, t), data))(keys)

    def init(self, theta, key: jax.Array) -> PESState:
        """A population whose pairs are at random points of their first inner problem."""
        k_fresh, k_offset = jax.random.split(key)
        inner = jax.vmap(self.fresh)(jax.random.split(k_fresh, self.pairs))
        offsets = jax.random.uniform(k_offset, (self.pairs,)) * inner.length
        inner = inner._replace(step=jnp.floor(offsets).astype(jnp.int32))
        return init_pes_state(theta, inner)
