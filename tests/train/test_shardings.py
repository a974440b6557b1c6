"""The optimizer state lives where its parameters live, on every mesh and for every optimizer.

Bounds come from the design: with a parameter sharded n ways, each state array that belongs
to it is sharded n ways too, so per-device optimizer bytes are the one-device figure over the
mesh's parameter split, plus the replicated counters and the few dims no mesh axis divides.
"""
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from model import make_mesh
from recipes.train import config as config_lib
from recipes.train.build import build_program
from recipes.train.checkpoint import Checkpointer
from recipes.train.shardings import bytes_per_device, derived_spec

OPTIMIZERS = ["adamw", "muon", "celo2", "celo2_base"]
MESHES = {"fsdp8": (1, 8, 1), "fsdp4_tensor2": (1, 4, 2), "data2_fsdp4": (2, 4, 1)}
TINY = ["--model.size=tiny", "--data.seq_len=32", "--data.global_batch=16", "--model.vocab_size=512"]


def program(name, overrides=(), mesh_shape=(1, 8, 1), shapes_only=True):
    config = config_lib.load_config(name, list(overrides))
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[: math.prod(mesh_shape)])
    return build_program(config, mesh=mesh, shapes_only=shapes_only)


def owners(prog):
    """(state leaf, its shape, its sharding, its parameter's shape and spec or None) for every leaf."""
    from recipes.train.shardings import _dict_keys, _owner

    params = {_dict_keys(path): (tuple(p.shape), s.spec) for (path, p), s in zip(
        jax.tree_util.tree_flatten_with_path(prog.params_abstract)[0], jax.tree.leaves(prog.shardings["params"]))}
    flat = jax.tree_util.tree_flatten_with_path(prog.state_abstract["opt_state"])[0]
    return [(jax.tree_util.keystr(path), x, _owner(path, params)) for path, x in flat]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_every_state_array_takes_its_parameters_layout(optimizer, mesh_name):
    prog = program("shakespeare_celo2", [*TINY, f"--optimizer.name={optimizer}"],
                   MESHES[mesh_name])
    sharded = 0
    for name, x, owner in owners(prog):
        if owner is None or x.ndim == 0:
            assert x.sharding.is_fully_replicated, name  # counters and the like
            continue
        param_shape, param_spec = owner
        if tuple(x.shape) == param_shape:
            assert x.sharding.spec == PartitionSpec(*param_spec, *[None] * (len(param_shape) - len(param_spec))), name
        sharded += not x.sharding.is_fully_replicated
        # Each device holds 1/n of the array, n the product of the mesh axes its spec names.
        axes = [a for entry in x.sharding.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
        split = math.prod(prog.mesh.shape[a] for a in axes)
        assert math.prod(x.sharding.shard_shape(x.shape)) * split == math.prod(x.shape), name
    assert sharded > 0


def test_factored_statistics_keep_their_axes_specs():
    spec = PartitionSpec(None, "fsdp", "tensor")
    assert derived_spec((2, 64, 192), (2, 64, 192), spec) == spec
    assert derived_spec((2, 64), (2, 64, 192), spec) == PartitionSpec(None, "fsdp")      # row: drops the large axis
    assert derived_spec((2, 192), (2, 64, 192), spec) == PartitionSpec(None, "tensor")   # column: drops the small
    assert derived_spec((1,), (), PartitionSpec()) is None                              # a scalar promoted to (1,)
    assert derived_spec((3, 3), (2, 64, 192), spec) is None


@pytest.mark.parametrize("recipe", ["gpt2_small_celo2", "gpt3xl_celo2", "gpt3xl_muon"])
def test_dry_run_bytes_per_device_shrink_with_the_mesh(recipe):
    one = program(recipe, mesh_shape=(1, 1, 1))
    whole = bytes_per_device(one.state_abstract["opt_state"])
    params_whole = bytes_per_device(one.state_abstract["params"])
    for mesh_shape in [(1, 8, 1), (1, 4, 2)]:
        prog = program(recipe, mesh_shape=mesh_shape)
        per_device = bytes_per_device(prog.state_abstract["opt_state"])
        assert per_device <= whole / 8 * 1.01, (mesh_shape, per_device, whole)
        # Parameters: everything but LayerNorm and biases (a fraction of a percent) splits 8 ways.
        assert bytes_per_device(prog.state_abstract["params"]) <= params_whole / 8 * 1.01


@pytest.mark.slow
def test_moments_keep_their_parameters_sharding_through_real_steps():
    prog = program("shakespeare_celo2", [*TINY, "--optimizer.name=celo2", "--optimizer.theta=celo2_lm"],
                   (1, 4, 2), shapes_only=False)
    state = prog.init_state()
    tokens = np.random.default_rng(0).integers(0, 512, (16, 33), dtype=np.int32)
    with jax.set_mesh(prog.mesh):
        for _ in range(2):
            state, metrics = prog.train_step(state, jax.device_put(tokens, prog.batch_sharding))
    assert bool(metrics["finite"])
    got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state["opt_state"]))
    want = jax.tree.leaves(prog.shardings["opt_state"])
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.spec == w.spec
    assert sum(not g.is_fully_replicated for g in got) > len(got) // 2


@pytest.mark.slow
def test_a_checkpoint_with_replicated_optimizer_state_restores_onto_the_sharded_layout(tmp_path):
    """Checkpoints written when the optimizer state was replicated on every device still resume."""
    prog = program("shakespeare_celo2", [*TINY, "--optimizer.name=celo2", "--optimizer.theta=celo2_lm"],
                   (1, 8, 1), shapes_only=False)
    state = prog.init_state()
    replicated = NamedSharding(prog.mesh, PartitionSpec())
    state["opt_state"] = jax.tree.map(lambda x: jax.device_put((x + 1).astype(x.dtype), replicated), state["opt_state"])
    old = Checkpointer(tmp_path / "checkpoints")
    old.save(3, state, {"step": 3})
    old.close()
    restored = Checkpointer(tmp_path / "checkpoints").restore(3, prog.state_abstract)
    for got, want, sharding in zip(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(state["opt_state"]),
                                   jax.tree.leaves(prog.shardings["opt_state"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.spec == sharding.spec
