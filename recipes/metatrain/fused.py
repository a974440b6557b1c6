"""Task families of one shape train as one population.

Families whose tasks share a ``fusion_key`` (the same parameters, the same
loss given data) differ only in their data. Their particles go through one
vmapped unroll on concatenated data, each particle drawing batches from its
own family's window, so each of the many small operations of an inner step
(the learned rule on tiny tensors above all) runs once for all of them rather
than once per family. Resets, perturbations and keys are drawn per family
exactly as for a family alone, and the state stays one PESState per family:
fusing changes how the arithmetic is scheduled, not the estimate or the
checkpoint.
"""
from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recipes.metatrain.pes import PESState, pes_begin, pes_gradient
from recipes.metatrain.population import Population
from recipes.metatrain.tasks.base import WINDOW_KEYS, fuse_data


def fusable_groups(populations: Sequence[Population]) -> list[list[int]]:
    """Indices of populations, grouped by their task's fusion key, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, pop in enumerate(populations):
        groups.setdefault((pop.task.fusion_key(), pop.pes.particles), []).append(i)
    return list(groups.values())


def _concat(trees):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


class FusedFamilies:
    """One jitted truncation for several populations whose tasks share a fusion key."""

    def __init__(self, populations: Sequence[Population], devices: Sequence | None = None):
        """``devices``: where the particles are split (default: every local device)."""
        if len({(p.task.fusion_key(), p.pes.particles) for p in populations}) != 1:
            raise ValueError(f"only families of one shape fuse: {[p.task.name for p in populations]}")
        self.populations = list(populations)
        self.names = [p.task.name for p in populations]
        self.data, windows = fuse_data([p.task.data for p in populations])
        particles = populations[0].pes.particles
        self._bounds = np.cumsum([0] + [particles] * len(populations))
        # Each particle's window on the concatenated data: constants of the compiled program.
        self._lo = np.repeat([lo for lo, _ in windows], particles).astype(np.int32)
        self._n = np.repeat([n for _, n in windows], particles).astype(np.int32)
        self._devices = list(jax.local_devices() if devices is None else devices)
        self._jitted = jax.jit(self._truncation, donate_argnums=(1,))

    @functools.cached_property
    def _mesh(self):
        """The most devices that split the particles evenly (CPU devices run on threads of their own); None
        for one. Built once: every truncation places its inputs on it."""
        n = len(self._devices)
        while n > 1 and int(self._bounds[-1]) % n:
            n -= 1
        return None if n == 1 else jax.sharding.Mesh(np.array(self._devices[:n]), ("particles",))

    def _placement(self, states):
        """Where family states live between truncations: split over the particles where their leading
        axis divides evenly, replicated otherwise. Inputs and outputs alike, so that every truncation
        runs the first one's program (fresh or restored states would otherwise compile it twice)."""
        mesh = self._mesh
        if mesh is None:
            return None
        P = jax.sharding.PartitionSpec
        return jax.tree.map(lambda x: jax.sharding.NamedSharding(
            mesh, P("particles") if x.ndim and x.shape[0] % mesh.size == 0 else P()), states)

    def _placed(self, theta, states):
        """theta replicated (the outer update leaves it split) and the states as ``_placement`` says."""
        mesh = self._mesh
        if mesh is None:
            return theta, states
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.device_put(theta, replicated), jax.device_put(states, self._placement(states))

    def truncation(self, theta, states: tuple, keys: tuple, data: dict):
        """One truncation of every family (``_truncation``); consumes ``states``."""
        return self._jitted(*self._placed(theta, states), keys, data)

    def lower(self, theta, states: tuple, keys: tuple, data: dict):
        return self._jitted.lower(*self._placed(theta, states), keys, data)

    def _particle_data(self, data: dict) -> tuple[dict, dict]:
        """The data with per-particle windows, and the matching vmap axes."""
        data = {**data, "lo": jnp.asarray(self._lo), "n": jnp.asarray(self._n)}
        return data, {k: 0 if k in WINDOW_KEYS else None for k in data}

    def _truncation(self, theta, states: tuple, keys: tuple, data: dict):
        """One truncation of every family: a (new state, gradient, losses, resets) tuple per family."""
        lead = self.populations[0]
        sigma = lead.pes.sigma
        begun = [pes_begin(theta, s, k, sigma=sigma, maybe_reset=p.maybe_reset)
                 for p, s, k in zip(self.populations, states, keys)]
        data, data_axes = self._particle_data(data)
        unroll = jax.vmap(lead.unroll, in_axes=(0, 0, 0, data_axes))
        mesh = self._mesh
        if mesh is not None:
            P = jax.sharding.PartitionSpec
            spec = {k: P("particles") if a == 0 else P() for k, a in data_axes.items()}
            unroll = jax.shard_map(unroll, mesh=mesh, in_specs=(P("particles"), P("particles"), P("particles"), spec),
                                   out_specs=P("particles"))
        inner, losses = unroll(
            _concat([b.thetas for b in begun]), _concat([b.state.inner for b in begun]),
            jnp.concatenate([b.keys for b in begun]), data)
        out = []
        for i, b in enumerate(begun):
            part = slice(int(self._bounds[i]), int(self._bounds[i + 1]))
            inner_i = jax.tree.map(lambda x: x[part], inner)
            new_state = PESState(inner_i, b.state.accum)
            if mesh is not None:
                new_state = jax.lax.with_sharding_constraint(new_state, self._placement(new_state))
            out.append((new_state, pes_gradient(b.state.accum, losses[part], sigma), losses[part], b.was_reset))
        return tuple(out)

    @functools.cached_property
    def _forward_backward_only(self):
        """The same unroll with plain SGD in place of the harness: the task's own cost."""
        lead = self.populations[0]

        def run(theta, inner, keys, data):
            data, data_axes = self._particle_data(data)
            unroll = lambda i, k, d: lead.unroll(theta, i, k, d, rule=False)  # noqa: E731
            return jax.vmap(unroll, in_axes=(0, 0, data_axes))(inner, keys, data)

        return jax.jit(run)

    def time_split(self, theta, states: tuple, repeats: int = 1) -> tuple[float, float]:
        """Seconds per truncation of (all these families, their forward/backward passes alone).

        Runs on copies: the truncation consumes (donates) the states it is given.
        """
        keys = tuple(jax.random.split(jax.random.key(0), len(states)))
        inner = _concat([s.inner for s in states])
        particle_keys = jax.random.split(jax.random.key(0), int(self._bounds[-1]))
        runs = (lambda: self.truncation(theta, jax.tree.map(jnp.copy, states), keys, self.data),
                lambda: self._forward_backward_only(theta, inner, particle_keys, self.data))
        times = []
        for run in runs:
            jax.block_until_ready(run())  # compile (the truncation is compiled already in a run)
            start = time.perf_counter()
            for _ in range(repeats):
                jax.block_until_ready(run())
            times.append((time.perf_counter() - start) / repeats)
        return times[0], times[1]
