"""Families of one shape fused into one population give each family's own results."""
import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("sklearn")

from recipes.metatrain.config import MetaTrainConfig  # noqa: E402
from recipes.metatrain.fused import FusedFamilies, fusable_groups  # noqa: E402
from recipes.metatrain.loop import MetaTrainer  # noqa: E402
from recipes.optim.theta import resolve_theta  # noqa: E402
from tests.helpers import logged_lines  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "fixtures"


def _config(out_dir, families, particles=4):
    return MetaTrainConfig.from_dict({
        "metatrain": {"outer_steps": 2, "init_theta": "normalized_momentum", "outer_lr": 1e-2, "profile": False,
                      "snapshot_every": 0, "checkpoint_every_s": 0, "out_dir": str(out_dir)},
        "pes": {"particles": particles, "truncation": 2, "min_length": 2, "max_length": 6},
        "inner": {"scale_min": 0.5, "scale_max": 2.0},
        "families": families,
    })


FAMILIES = [
    {"kind": "image_mlp", "name": "a", "hidden": [8], "batch": 8},
    {"kind": "image_mlp", "name": "b", "hidden": [8], "batch": 8},
    {"kind": "image_mlp", "name": "c", "hidden": [], "batch": 8},
]


def test_families_group_by_shape(tmp_path):
    trainer = MetaTrainer(_config(tmp_path, FAMILIES))
    assert fusable_groups(trainer.populations) == [[0, 1], [2]]
    assert [names for names, _ in trainer.fused([0, 1, 2])] == [[0, 1], [2]]


@pytest.mark.slow
def test_fused_truncation_equals_each_family_alone(tmp_path):
    one_layer = [{**family, "hidden": []} for family in FAMILIES[:2]]  # compiles fastest
    trainer = MetaTrainer(_config(tmp_path, one_layer))
    theta = resolve_theta("normalized_momentum")
    state = trainer.fresh_state(theta)
    keys = (jax.random.key(5), jax.random.key(6))
    pops = trainer.populations
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    together = FusedFamilies(pops)
    fused = together.truncation(theta, copy((state.populations["a"], state.populations["b"])), keys, together.data)
    alone = FusedFamilies(pops[:1])  # a and b share task and data: one single-family program serves both
    for i, name in enumerate(("a", "b")):
        (single,) = alone.truncation(theta, copy((state.populations[name],)), (keys[i],), alone.data)
        for x, y in zip(jax.tree.leaves(fused[i]), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_each_particle_draws_from_its_own_family_window(tmp_path):
    trainer = MetaTrainer(_config(tmp_path, FAMILIES[:2]))
    together = FusedFamilies(trainer.populations)
    n = int(trainer.populations[0].task.data["n"])
    data, axes = together._particle_data(together.data)
    assert data["x"].shape[0] == 2 * n  # the two families' rows, concatenated
    np.testing.assert_array_equal(np.asarray(data["lo"]), [0] * 4 + [n] * 4)
    assert axes["x"] is None and axes["lo"] == 0


@pytest.mark.slow
def test_a_checkpoint_written_before_fusion_still_resumes(tmp_path):
    """tests/fixtures/metatrain_checkpoint_v1 was written by the per-family loop (two outer steps)."""
    out = tmp_path / "run"
    shutil.copytree(DATA / "metatrain_checkpoint_v1", out)
    config = MetaTrainConfig.from_dict({
        "metatrain": {"outer_steps": 3, "init_theta": "normalized_momentum", "outer_lr": 1e-2, "profile": False,
                      "snapshot_every": 0, "checkpoint_every_s": 0, "out_dir": str(out)},
        "pes": {"particles": 2, "truncation": 2, "min_length": 2, "max_length": 4},
        "inner": {"scale_min": 0.5, "scale_max": 2.0},
        "families": [{"kind": "image_mlp", "hidden": [], "batch": 8}],
    })
    with logged_lines() as lines:
        state = MetaTrainer(config).run()
    assert any("resumed" in line and "outer step 2" in line for line in lines)
    assert int(state.step) == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.theta))
    # The npz checkpoint is read; the run goes on in orbax checkpoints, which the next resume takes.
    assert (out / "checkpoints" / "3").is_dir()
    with logged_lines() as lines:
        again = MetaTrainer(dataclasses.replace(config, metatrain=dataclasses.replace(config.metatrain,
                                                                                      outer_steps=4))).run()
    assert any("resumed" in line and "outer step 3" in line for line in lines) and int(again.step) == 4

