"""Persistent evolution strategies (Vicol, Metz, Sohl-Dickstein, ICML 2021).

A population of antithetic pairs unrolls the inner problem with theta + eps
and theta - eps. The pair shares everything else: its data, its resets and
its initial parameters, so the loss difference is due to eps alone. Each
pair keeps the sum of the perturbations it has seen since its inner problem
was last reset; weighting the loss difference by that sum (instead of by the
latest eps only) makes the estimate unbiased for the loss of the whole
unrolled trajectory, however many truncations it spans.

This module knows nothing of tasks: ``unroll(theta, inner, key)`` advances
one particle's inner state by one truncation and returns its meta-loss;
``maybe_reset(inner, key)`` starts a new inner problem where the current one
is over and says whether it did.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class PESState(NamedTuple):
    inner: Any  # each leaf has a leading axis of 2 * pairs: the + particles, then the - particles
    accum: Any  # theta-shaped leaves with a leading axis of pairs: perturbations since the last reset


def init_pes_state(theta, inner_pairs) -> PESState:
    """Both members of a pair start from the same inner state (leading axis ``pairs``)."""
    pairs = jax.tree.leaves(inner_pairs)[0].shape[0]
    inner = jax.tree.map(lambda x: jnp.concatenate([x, x]), inner_pairs)
    accum = jax.tree.map(lambda t: jnp.zeros((pairs,) + t.shape, t.dtype), theta)
    return PESState(inner, accum)


def _pairs(state: PESState) -> int:
    return jax.tree.leaves(state.accum)[0].shape[0]


def _tree_where(mask, on_true, on_false):
    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(pick, on_true, on_false)


def perturbations(theta, key, pairs: int, sigma: float):
    """Gaussian eps of std sigma for each pair, one draw per theta leaf."""
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(key, len(leaves))
    eps = [sigma * jax.random.normal(k, (pairs,) + x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return treedef.unflatten(eps)


class Begun(NamedTuple):
    """A population ready to unroll: resets applied, perturbations drawn."""

    state: PESState  # inner states after resets; accum includes this truncation's eps
    thetas: Any  # theta-shaped leaves with a leading axis of 2 * pairs: theta + eps, then theta - eps
    keys: jax.Array  # (2 * pairs,) unroll keys, shared by the two members of a pair
    was_reset: jax.Array  # (pairs,)


def pes_begin(theta, state: PESState, key: jax.Array, *, sigma: float, maybe_reset: Callable) -> Begun:
    """Everything of a truncation before the unroll: resets, fresh eps, the particles' thetas."""
    pairs = _pairs(state)
    reset_key, eps_key, unroll_key = jax.random.split(key, 3)

    # The same keys for both halves: a pair resets together, to the same initial state.
    reset_keys = jnp.concatenate([jax.random.split(reset_key, pairs)] * 2)
    inner, was_reset = jax.vmap(maybe_reset)(state.inner, reset_keys)
    was_reset = was_reset[:pairs]
    accum = _tree_where(was_reset, jax.tree.map(jnp.zeros_like, state.accum), state.accum)

    eps = perturbations(theta, eps_key, pairs, sigma)
    accum = jax.tree.map(jnp.add, accum, eps)
    thetas = jax.tree.map(lambda t, e: jnp.concatenate([t + e, t - e]), theta, eps)
    unroll_keys = jnp.concatenate([jax.random.split(unroll_key, pairs)] * 2)
    return Begun(PESState(inner, accum), thetas, unroll_keys, was_reset)


def pes_gradient(accum, losses: jax.Array, sigma: float):
    """The PES estimate from a population's accumulated eps and its (2 * pairs,) meta-losses."""
    pairs = jax.tree.leaves(accum)[0].shape[0]
    diff = (losses[:pairs] - losses[pairs:]) / (2.0 * sigma**2)
    return jax.tree.map(lambda a: jnp.tensordot(diff, a, axes=1) / pairs, accum)


def pes_truncation(
    theta,
    state: PESState,
    key: jax.Array,
    *,
    sigma: float,
    unroll: Callable,
    maybe_reset: Callable,
):
    """One truncation of every particle.

    Returns (new state, gradient estimate shaped like theta, per-particle
    meta-losses (2 * pairs,), per-pair reset flags (pairs,)).
    """
    begun = pes_begin(theta, state, key, sigma=sigma, maybe_reset=maybe_reset)
    inner, losses = jax.vmap(unroll)(begun.thetas, begun.state.inner, begun.keys)
    grad = pes_gradient(begun.state.accum, losses, sigma)
    return PESState(inner, begun.state.accum), grad, losses, begun.was_reset
