"""lm_sampler.shapes: language-model families of a few fixed shapes, each shape one fused population."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config_base import ConfigError
from recipes.metatrain import checkpoint as ckpt
from recipes.metatrain.config import LMSamplerConfig, MetaTrainConfig
from recipes.metatrain.fused import FusedFamilies, fusable_groups
from recipes.metatrain.loop import MetaTrainer
from recipes.optim.theta import resolve_theta

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "metatrain"
TINY_LM = {
    "metatrain": {"outer_steps": 2, "init_theta": "normalized_momentum", "outer_lr": 1e-2, "profile": False,
                  "snapshot_every": 0, "checkpoint_every_s": 0},
    "pes": {"particles": 2, "truncation": 2, "min_length": 2, "max_length": 4},
    "inner": {"scale_min": 0.5, "scale_max": 2.0},
    "lm_sampler": {"count": 2, "shapes": [[1, 16, 8]], "batch": 2, "vocab": 32},
}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    config = MetaTrainConfig.from_dict({**TINY_LM, "metatrain": {**TINY_LM["metatrain"], "out_dir": str(tmp_path_factory.mktemp("lm"))}})
    return MetaTrainer(config)


def test_random_draws_are_unchanged_without_shapes():
    """lm.yaml's families (and so the checkpoints of runs from it) stay those drawn before the option."""
    names = [f.name for f in MetaTrainConfig.from_file(CONFIGS / "lm.yaml").all_families()]
    assert names == ["digits_mlp_64_32", "lm_l2_d64_c32", "lm_l2_d64_c64", "lm_l1_d32_c64", "lm_l1_d64_c32"]


def test_shapes_are_taken_in_turn_and_fuse_by_shape():
    sampler = LMSamplerConfig(count=5, shapes=[[1, 32, 32], [2, 32, 32]])
    families = sampler.families()
    assert [f.name for f in families] == ["lm_l1_d32_c32", "lm_l2_d32_c32", "lm_l1_d32_c32_2",
                                          "lm_l2_d32_c32_2", "lm_l1_d32_c32_3"]
    config = MetaTrainConfig.from_dict({**TINY_LM, "lm_sampler": {"count": 4, "shapes": [[1, 16, 8], [2, 16, 8]], "vocab": 32}})
    trainer = MetaTrainer(config)
    assert fusable_groups(trainer.populations) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("shapes", [[[1, 32]], [[1, 0, 32]], [[1, 32, 32, 4]]])
def test_malformed_shapes_are_refused(shapes):
    with pytest.raises(ConfigError, match="lm_sampler.shapes"):
        MetaTrainConfig.from_dict({**TINY_LM, "lm_sampler": {"count": 2, "shapes": shapes}})


def test_a_checkpoint_written_before_the_option_still_matches(trainer):
    """A saved lm_sampler without `shapes` (runs from before it) reads as today's default."""
    unshaped = MetaTrainConfig.from_dict({**TINY_LM, "lm_sampler": {"count": 2, "batch": 2, "vocab": 32}})
    record = ckpt.config_record(unshaped)
    saved = {k: record[k] for k in ckpt._MUST_MATCH}
    saved["lm_sampler"] = {k: v for k, v in saved["lm_sampler"].items() if k != "shapes"}
    ckpt._check_settings(saved, unshaped, trainer.out_dir)  # no ConfigError
    with pytest.raises(ConfigError, match="different"):
        ckpt._check_settings(saved, trainer.config, trainer.out_dir)


@pytest.mark.slow
def test_fused_lm_population_equals_each_family_alone(trainer):
    theta = resolve_theta("normalized_momentum")
    state = trainer.fresh_state(theta)
    names = [p.task.name for p in trainer.populations]
    keys = (jax.random.key(5), jax.random.key(6))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    together = FusedFamilies(trainer.populations)
    # The particles split over the test's CPU devices: the GPT's sharding constraints must stand aside
    # inside the particles' shard_map.
    assert together._mesh is not None and together._mesh.size > 1
    fused = together.truncation(theta, copy(tuple(state.populations[n] for n in names)), keys, together.data)
    # The two families have the same task and data: one single-family program serves both.
    alone = FusedFamilies(trainer.populations[:1])
    for i, name in enumerate(names):
        (single,) = alone.truncation(theta, copy((state.populations[name],)), (keys[i],), alone.data)
        for x, y in zip(jax.tree.leaves(fused[i]), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    for _, grad, losses, _ in fused:  # allclose passes NaN == NaN
        assert all(np.isfinite(np.asarray(x)).all() for x in [losses, *jax.tree.leaves(grad)])
    # Different states and keys: the families' estimates are their own, not copies.
    assert not np.allclose(np.asarray(fused[0][2]), np.asarray(fused[1][2]))


def _run(trainer, out_dir, steps):
    return trainer.retarget(out_dir=str(out_dir), outer_steps=steps).run()


@pytest.mark.slow
def test_resume_of_a_fused_lm_run_is_exact(trainer, tmp_path):
    uninterrupted = [np.asarray(x) for x in jax.tree.leaves(_run(trainer, tmp_path / "full", 3))]
    _run(trainer, tmp_path / "split", 1)
    resumed = _run(trainer, tmp_path / "split", 3)
    assert int(resumed.step) == 3
    for a, b in zip(uninterrupted, jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # Fresh, restored and updated states all met one compiled truncation (a second costs as much again).
    assert [group._jitted._cache_size() for group in trainer._fused.values()] == [1]
