"""The held-out evaluation runs and tabulates (a tiny task, two steps)."""
import dataclasses
import json

import numpy as np
import pytest

from recipes.optim.theta import normalized_momentum_theta
from recipes.metatrain.config import FamilyConfig
from recipes.metatrain.evaluate import (HELD_OUT, Candidate, EvalSettings, _compiled_run, evaluate, format_table,
                                       model_key, point_key)
from recipes.metatrain.tasks.lm import TinyLM
from tests.helpers import logged_lines


@pytest.mark.slow
def test_evaluate_tabulates_best_lr_and_resumes_from_its_results_file(tmp_path):
    task = TinyLM(FamilyConfig(kind="lm", n_layer=1, n_head=1, d_model=8, context_length=8, batch=4, vocab=64))
    settings = EvalSettings(steps=2, seeds=2, val_windows=8)
    theta = normalized_momentum_theta()
    results = tmp_path / "points.json"
    candidate = Candidate("celo2", "celo2", 1e-3, theta, 20.0)
    rows = evaluate([candidate], settings, task, results_file=results)
    assert len(rows) == 1 and rows[0]["grid"] == [1e-3]
    assert len(rows[0]["per_seed"]) == 2 and np.isfinite(rows[0]["mean"])
    assert abs(rows[0]["mean"] - np.log(64)) < 1.0  # two steps from a fresh model: near uniform
    assert "| celo2 | 0.001" in format_table(rows, settings)
    with logged_lines() as lines:
        again = evaluate([candidate, Candidate("celo2", "celo2", 3e-3, theta, 20.0)], settings, task,
                         results_file=results)
    assert "(done before)" in lines[0] and "(done before)" not in lines[1]  # only the new point trained
    assert {p["lr"]: p["mean"] for p in again[0]["points"]}[1e-3] == rows[0]["mean"]
    assert len(json.loads(results.read_text())) == 2


@pytest.mark.slow
def test_best_point_searches_the_side_multiplier_and_flags_grid_edges():
    task = TinyLM(FamilyConfig(kind="lm", n_layer=1, n_head=1, d_model=8, context_length=8, batch=4, vocab=64))
    settings = EvalSettings(steps=4, seeds=1, val_windows=8)
    candidates = [Candidate("muon", "muon", lr, None, mult, (("consistent_rms", 0.2),))
                  for mult in (1.0, 30.0) for lr in (1e-3, 3e-2)]
    compiled_before = _compiled_run.cache_info().misses
    (row,) = evaluate(candidates, settings, task)
    assert _compiled_run.cache_info().misses == compiled_before + 1  # one program for the whole grid
    assert row["grid"] == [1e-3, 3e-2] and row["mult_grid"] == [1.0, 30.0] and len(row["points"]) == 4
    assert row["mean"] == min(p["mean"] for p in row["points"])
    assert row["at_edge"]  # a two-point grid: the best point is always on an edge
    assert "at the grid's edge" in format_table([row], settings)


def test_eval_script_default_task_on_a_prepared_corpus(tmp_path):
    """--task default with --corpus: the default recipe's shape on a user's own shards, one tiny point."""
    import subprocess
    import sys
    from pathlib import Path

    from data.prepare_corpus import prepare_files

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Line {i}: all the world's a stage, and {i % 5} players." for i in range(3000)))
    prepare_files([text], tmp_path / "shards", text_unit="paragraph", val_fraction=0.1, workers=1, progress=False)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "scripts/eval_optimizer.py", "--task", "default", "--corpus",
                          str(tmp_path / "shards"), "--steps", "2", "--seeds", "1", "--val-windows", "16",
                          "--celo2-lrs", "1e-3", "--adamw-mults", "1", "--no-baselines", "--compilation-cache", ""],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "default task default_recipe_l4_d64_c64 on " + str(tmp_path / "shards") in run.stdout
    assert "| celo2 (normalized_momentum) | 0.001 (0.001) | 1 (1) |" in run.stdout


@pytest.mark.slow
def test_screened_search_extends_an_edge_and_retrains_the_best_point_with_every_seed(tmp_path):
    task = TinyLM(FamilyConfig(kind="lm", n_layer=1, n_head=1, d_model=8, context_length=8, batch=4, vocab=64))
    settings = EvalSettings(steps=3, seeds=2, val_windows=8)
    # lr 1e-4 and 1e-3 are both far too small for 3 steps: the best is the upper edge, so 1e-2 is tried.
    candidates = [Candidate("adamw", "adamw", lr) for lr in (1e-4, 1e-3)]
    with logged_lines() as lines:
        (row,) = evaluate(candidates, settings, task, screen_seeds=1, extend_edges=1,
                          results_file=tmp_path / "points.json")
    assert row["grid"] == [1e-4, 1e-3, 1e-2] and len(row["points"]) == 3
    assert row["lr"] == 1e-2 == min(row["points"], key=lambda p: p["mean"])["lr"]
    assert row["search_seeds"] == 1 and len(row["per_seed"]) == 2  # the final run has every seed
    assert sum("(1 seed, search)" in line for line in lines) == 3 and "search" not in lines[-1]
    assert row["at_edge"] == ["lr 0.01"]  # one extension allowed, still the edge: said, not hidden
    assert "Grids searched with 1 seed(s)" in format_table([row], settings)


def test_default_task_is_read_from_the_default_recipe():
    """The table's 'default recipe' cannot drift from the recipe users run."""
    from recipes.train.config import load_config
    from recipes.metatrain.evaluate import default_recipe_task

    family, settings = default_recipe_task()
    cfg = load_config("shakespeare_celo2.yaml")
    assert (family.n_layer, family.n_head, family.d_model) == (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model)
    assert (family.context_length, family.batch, family.vocab) == (cfg.data.seq_len, cfg.data.global_batch, 50257)
    assert settings["steps"] == cfg.train.steps
    assert round(settings["warmup_fraction"] * settings["steps"]) == cfg.optimizer.schedule.warmup_steps
    assert (settings["min_lr_ratio"], settings["weight_decay"]) == (0.1, cfg.optimizer.weight_decay)


def test_stored_points_keep_their_keys_when_a_result_neutral_model_field_is_added():
    # The model part of a key written before ModelConfig had unroll_layers: it must still match.
    stored = ("ModelConfig(n_layer=2, n_head=2, d_model=48, context_length=48, vocab_size=512, "
              "pad_vocab_multiple=64, bias=True, compute_dtype='float32', remat=False, layer_norm_eps=1e-05, "
              "init_std=0.02, attention_impl='xla')")
    task = TinyLM(HELD_OUT)
    key = json.loads(point_key(task, EvalSettings(), Candidate("adamw", "adamw", 1e-3)))
    assert key[2] == stored
    assert model_key(dataclasses.replace(task.config, unroll_layers=False)) == stored
    assert model_key(dataclasses.replace(task.config, loss_chunk_tokens=7)) == stored
    assert model_key(dataclasses.replace(task.config, remat="full")) != stored
    assert model_key(dataclasses.replace(task.config, residual_dtype="bfloat16")) != stored
