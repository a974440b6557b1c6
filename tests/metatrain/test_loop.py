"""Meta-training end to end on a tiny digits family: checkpoints, the theta format, resume."""
import json

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn")

from recipes.optim.theta import load_checkpoint, validate_theta  # noqa: E402
from recipes.metatrain import checkpoint as ckpt  # noqa: E402
from recipes.metatrain.config import MetaTrainConfig  # noqa: E402
from recipes.metatrain.loop import MetaTrainer  # noqa: E402

TINY = {
    "metatrain": {"outer_steps": 2, "init_theta": "normalized_momentum", "outer_lr": 1e-2, "profile": False,
                  "snapshot_every": 1, "checkpoint_every_s": 0},
    "pes": {"particles": 2, "truncation": 2, "min_length": 2, "max_length": 4},
    "inner": {"scale_min": 0.5, "scale_max": 2.0},
    "families": [{"kind": "image_mlp", "hidden": [], "batch": 8}],  # one matrix: the cheapest compile
}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    config = MetaTrainConfig.from_dict({**TINY, "metatrain": {**TINY["metatrain"], "out_dir": str(tmp_path_factory.mktemp("a"))}})
    return MetaTrainer(config)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope="module")
def trained(trainer):
    """The two-step run, done once in whichever test process needs it."""
    return trainer.run()


def test_run_writes_official_theta_config_and_metrics(trainer, trained):
    state = trained
    out = trainer.out_dir
    assert int(state.step) == 2
    theta = load_checkpoint(out / "theta.state")
    validate_theta(theta)
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(state.theta)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert (out / "thetas" / "theta_0000002.state").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["pes"]["particles"] == 2 and config["metatrain"]["outer_steps"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["outer_step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["meta_loss"]) and r["outer_it_per_s"] > 0 for r in records)
    # theta moved away from the start
    assert not np.allclose(np.asarray(state.theta["ff_mod_stack"]["~"]["w0__5"]), load_checkpoint_start())


def load_checkpoint_start():
    from recipes.optim.theta import normalized_momentum_theta
    return normalized_momentum_theta()["ff_mod_stack"]["~"]["w0__5"]


def test_state_round_trip(trainer, trained, tmp_path):
    state = trainer.fresh_state(jax.tree.map(np.asarray, load_checkpoint(trainer.out_dir / "theta.state")))
    other = trainer.retarget(out_dir=str(tmp_path))
    saver = ckpt.MetaCheckpointer(tmp_path, other.config)
    saver.save(state)
    saver.close()
    reader = ckpt.MetaCheckpointer(tmp_path, other.config)  # a fresh process's view
    assert reader.exists()
    restored = reader.restore_newest(jax.eval_shape(lambda: state))
    reader.close()
    assert (tmp_path / ckpt.CHECKPOINTS_DIR / "0").is_dir()
    for a, b in zip(_leaves(state), _leaves(restored)):
        np.testing.assert_array_equal(a, b)


def test_resume_matches_uninterrupted_run(trainer, tmp_path):
    uninterrupted = _leaves(_run(trainer, tmp_path / "full", 3))
    _run(trainer, tmp_path / "split", 1)
    resumed = _run(trainer, tmp_path / "split", 3)
    assert int(resumed.step) == 3
    for a, b in zip(uninterrupted, _leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["outer_step"] for line in lines] == [1, 2, 3]


def test_resume_refuses_changed_problem(trainer, tmp_path):
    _run(trainer, tmp_path, 1)
    changed = MetaTrainConfig.from_dict({**TINY, "pes": {**TINY["pes"], "sigma": 0.02},
                         "metatrain": {**TINY["metatrain"], "out_dir": str(tmp_path)}})
    reader = ckpt.MetaCheckpointer(tmp_path, changed)
    with pytest.raises(ValueError, match="different"):
        reader.restore_newest(jax.eval_shape(lambda: trainer.fresh_state(_theta())))
    reader.close()
    assert [p.name for p in (tmp_path / ckpt.CHECKPOINTS_DIR).iterdir()] == ["1"]  # refused, not moved aside


def _theta():
    from recipes.optim.theta import resolve_theta
    return resolve_theta("normalized_momentum")


def _run(trainer, out_dir, steps):
    return trainer.retarget(out_dir=str(out_dir), outer_steps=steps).run()


def test_metrics_and_wandb_go_through_the_trainers_log(trainer, tmp_path):
    """Real W&B in offline mode: one run id per directory (kept across a resume, under the
    trainer's wandb_id.txt), and metrics.jsonl rows carry the trainer's `step` key."""
    run = trainer.retarget(out_dir=str(tmp_path), outer_steps=1, wandb="offline")
    run.run()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    trainer.retarget(out_dir=str(tmp_path), outer_steps=2, wandb="offline").run()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["outer_step"]) for r in rows if r["kind"] == "train"] == [(1, 1), (2, 2)]
