"""Shipping a meta-trained theta: snapshots scored on a validation task, the best copied with its provenance;
a name is a plain folder name, and a shipped theta is replaced only when asked."""
import json

import jax
import numpy as np
import pytest

from recipes.optim.theta import init_theta, load_checkpoint, normalized_momentum_theta, save_checkpoint
from model.config_base import ConfigError
from recipes.metatrain.config import FamilyConfig
from recipes.metatrain.evaluate import EvalSettings
from recipes.metatrain.ship import score_snapshots, ship, snapshots
from recipes.metatrain.tasks.lm import TinyLM
from tests.helpers import logged_lines, one_error_line, run_at_once


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(normalized_momentum_theta(), run / "thetas" / "theta_0000010.state")
    save_checkpoint(init_theta(jax.random.key(3)), run / "thetas" / "theta_0000020.state")
    save_checkpoint(init_theta(jax.random.key(4)), run / "thetas" / "theta_0000025.state")
    (run / "config.json").write_text(json.dumps({"metatrain": {"init_theta": "normalized_momentum"}}))
    return run


def test_snapshots_filter_by_step_and_keep_the_last(run_dir):
    assert sorted(snapshots(run_dir)) == [10, 20, 25]
    assert sorted(snapshots(run_dir, every=20)) == [20, 25]


def test_missing_snapshots_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="snapshot_every"):
        snapshots(tmp_path)


@pytest.mark.slow
def test_ship_copies_the_best_scoring_snapshot(run_dir, tmp_path):
    task = TinyLM(FamilyConfig(kind="lm", n_layer=1, n_head=1, d_model=8, context_length=8, batch=4, vocab=64))
    paths = snapshots(run_dir)
    rows = score_snapshots(paths, task, EvalSettings(steps=3, seeds=2, val_windows=8), [1e-2], 1.0)
    assert sorted(r["outer_step"] for r in rows) == [10, 20, 25]
    best = min(rows, key=lambda r: r["mean"])
    shipped = ship(run_dir, "tiny", rows, paths, "a test", weights_dir=tmp_path / "weights")
    assert shipped.read_bytes() == paths[best["outer_step"]].read_bytes()
    load_checkpoint(shipped)
    provenance = json.loads((shipped.parent / "provenance.json").read_text())
    assert provenance["outer_step"] == best["outer_step"] and provenance["selected_by"] == "a test"
    assert [s["outer_step"] for s in provenance["scores"]] == [10, 20, 25]
    assert json.loads((shipped.parent / "config.json").read_text())["metatrain"]["init_theta"] == "normalized_momentum"
    before = {p.name: p.read_bytes() for p in shipped.parent.iterdir()}
    with pytest.raises(ConfigError, match="already shipped as 'tiny'.*--overwrite"):
        ship(run_dir, "tiny", rows, paths, "another test", weights_dir=tmp_path / "weights")
    assert {p.name: p.read_bytes() for p in shipped.parent.iterdir()} == before
    ship(run_dir, "tiny", rows, paths, "another test", weights_dir=tmp_path / "weights", overwrite=True)
    assert json.loads((shipped.parent / "provenance.json").read_text())["selected_by"] == "another test"
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["config.json", "provenance.json", "theta.state"]


def test_ship_refuses_when_every_snapshot_diverged(run_dir, tmp_path):
    rows = [{"outer_step": 10, "lr": 1e-3, "mean": np.inf, "std": np.nan}]
    with pytest.raises(ValueError, match="diverged"):
        ship(run_dir, "tiny", rows, snapshots(run_dir), "a test", weights_dir=tmp_path / "weights")


@pytest.mark.slow
def test_progress_scores_new_snapshots_only_and_draws_the_curve(run_dir, tmp_path):
    from recipes.metatrain.progress import plot, update_scores

    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "train", "outer_step": s, "meta_loss": 1.0 - 0.01 * s}) + "\n" for s in range(1, 26)))
    task = TinyLM(FamilyConfig(kind="lm", n_layer=1, n_head=1, d_model=8, context_length=8, batch=4, vocab=64))
    settings = EvalSettings(steps=3, seeds=1, val_windows=8)
    grids = {"adamw": (1e-2,), "muon": (1e-2,)}
    with logged_lines() as seen:
        record = update_scores(run_dir, task, settings, 1.0, celo2_lrs=(1e-2,), reference_grids=grids)
    assert sorted(int(k) for k in record["snapshots"]) == [0, 10, 20, 25]  # 0: the starting theta
    assert set(record["references"]) == {"normalized_momentum", "adamw", "muon"}
    assert len(seen) == 7
    save_checkpoint(normalized_momentum_theta(), run_dir / "thetas" / "theta_0000030.state")
    with logged_lines() as seen:
        record = update_scores(run_dir, task, settings, 1.0, celo2_lrs=(1e-2,), reference_grids=grids)
    assert len(seen) == 1 and "30" in record["snapshots"]  # only the new snapshot was trained
    out = plot(run_dir, [record], tmp_path / "curve.png")
    assert out.stat().st_size > 10_000
    from recipes.metatrain.progress import scored_snapshots

    known = scored_snapshots(run_dir, task, settings, (1e-2,), 1.0)
    assert sorted(known) == [10, 20, 25, 30]  # the starting theta is no snapshot
    assert known[10]["mean"] == record["snapshots"]["10"]["mean"] and known[10]["outer_step"] == 10
    assert scored_snapshots(run_dir, task, settings, (3e-3,), 1.0) == {}  # other settings: score again
    assert scored_snapshots(run_dir, task, EvalSettings(steps=4, seeds=1, val_windows=8), (1e-2,), 1.0) == {}
    shipped = ship(run_dir, "reused", list(known.values()), snapshots(run_dir), "test", tmp_path / "weights")
    assert shipped.is_file()
    with pytest.raises(ConfigError, match="other settings"):  # never mixes scores of two settings
        update_scores(run_dir, task, settings, 3.0, celo2_lrs=(1e-2,), reference_grids=grids)


def test_ship_theta_refuses_a_path_as_name_and_an_existing_theta_in_one_line(run_dir, tmp_path):
    weights = tmp_path / "weights"
    (weights / "taken").mkdir(parents=True)
    (weights / "taken" / "theta.state").write_bytes(b"shipped before")
    cases = {"../x": "error: --name must be a plain name", "a/b": "error: --name must be a plain name",
             "..": "error: --name must be a plain name", "taken": "error: a theta is already shipped as 'taken'"}
    results = run_at_once({name: ["scripts/ship_theta.py", "--run", str(run_dir), "--name", name, "--weights-dir",
                                  str(weights), "--compilation-cache", ""] for name in cases}, tmp_path)
    for name, result in results.items():
        assert result.returncode == 1 and one_error_line(result).startswith(cases[name]), (name, result.stderr[-2000:])
        assert "scoring" not in result.stdout  # refused before minutes of scoring
    assert {p.name for p in tmp_path.iterdir()} <= {"run", "weights", "jax_cache"}  # no x beside the weights
    assert [p.name for p in weights.iterdir()] == ["taken"]
    assert (weights / "taken" / "theta.state").read_bytes() == b"shipped before"
