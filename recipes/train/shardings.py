"""Where every array of the train state lives on the mesh.

Parameters follow the model's logical sharding rules. Optimizer state follows its
parameters: each state array is matched to the parameter whose key path it
contains (optax nests a parameter tree inside every moment, accumulator and
per-tensor statistic), and takes that parameter's PartitionSpec, or, for a
statistic that keeps only some of the parameter's axes (Celo2's factored row and
column second moments), the spec entries of the axes it keeps. Arrays that belong
to no parameter (step counters, schedule state) are replicated.

The layout is derived from paths and shapes, not from compiling ``tx.init``: jit
drops inputs that are never read, so an init built from ``zeros`` compiles for one
device and says nothing about where its outputs should live.
"""
from __future__ import annotations

import itertools
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import abstract_params, param_shardings
from model.config import ModelConfig


def param_sharding_dict(config: ModelConfig, mesh: Mesh) -> dict:
    """The parameters' NamedShardings on ``mesh`` as a nested dict shaped like the state's params."""
    _, state = abstract_params(config)
    return nnx.to_pure_dict(param_shardings(state, mesh))


def _dict_keys(path) -> tuple:
    """The dict keys of a key path, None for any other kind of key (attributes, list indices)."""
    return tuple(k.key if isinstance(k, jax.tree_util.DictKey) else None for k in path)


def _owner(path, params_by_keys: dict):
    """The parameter whose dict-key path occurs (contiguously) in ``path``, earliest and longest first."""
    keys = _dict_keys(path)
    for start in range(len(keys)):
        for end in range(len(keys), start, -1):
            found = params_by_keys.get(keys[start:end])
            if found is not None:
                return found
    return None


def derived_spec(shape: tuple, param_shape: tuple, param_spec: PartitionSpec) -> PartitionSpec | None:
    """The spec of a state array of ``shape`` that belongs to a parameter, or None if its shape
    is not the parameter's or the parameter's with some axes dropped."""
    entries = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
    if tuple(shape) == tuple(param_shape):
        return PartitionSpec(*entries)
    # Axes kept in order; where two choices fit (a square matrix's row and column statistics) the
    # first is taken: both shapes and both memory footprints are the same.
    for kept in itertools.combinations(range(len(param_shape)), len(shape)):
        if len(shape) and tuple(param_shape[i] for i in kept) == tuple(shape):
            return PartitionSpec(*(entries[i] for i in kept))
    return None


def optimizer_state_shardings(opt_state_abstract, params_abstract: dict, param_sh: dict, mesh: Mesh):
    """NamedShardings for an optimizer state (abstract or concrete), derived from the parameters'."""
    params_by_keys = {}
    for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0], jax.tree.leaves(param_sh)):
        params_by_keys[_dict_keys(path)] = (tuple(p.shape), s.spec)
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding_of(path, leaf):
        owner = _owner(path, params_by_keys)
        if owner is None or not np.shape(leaf):
            return replicated
        spec = derived_spec(np.shape(leaf), *owner)
        return replicated if spec is None else NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding_of, opt_state_abstract)


def state_shardings(tx, params_abstract: dict, param_sh: dict, mesh: Mesh) -> dict:
    """Shardings of the whole train state {params, opt_state, step}."""
    opt_state_abstract = jax.eval_shape(tx.init, params_abstract)
    return {"params": param_sh,
            "opt_state": optimizer_state_shardings(opt_state_abstract, params_abstract, param_sh, mesh),
            "step": NamedSharding(mesh, PartitionSpec())}


def bytes_per_device(tree) -> int:
    """Largest per-device bytes of an abstract tree with shardings (shards may be uneven)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total
