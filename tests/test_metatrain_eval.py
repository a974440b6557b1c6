"""The held-out evaluation runs and tabulates (a tiny task, two steps)."""
import json

import numpy as np

from recipes.celo2 import normalized_momentum_theta
from recipes.metatrain.config import FamilyConfig
from recipes.metatrain.evaluate import Candidate, EvalSettings, evaluate, format_table
from recipes.metatrain.tasks_lm import TinyLM


def test_evaluate_tabulates_best_lr_and_resumes_from_its_results_file(tmp_path):
    task = TinyLM(FamilyConfig(kind="lm", n_layer=1, n_head=1, d_model=8, context_length=8, batch=4, vocab=64))
    settings = EvalSettings(steps=2, seeds=2, val_windows=8)
    theta = normalized_momentum_theta()
    results = tmp_path / "points.json"
    candidate = Candidate("celo2", "celo2", 1e-3, theta, 20.0)
    rows = evaluate([candidate], settings, task, log=lambda line: None, results_file=results)
    assert len(rows) == 1 and rows[0]["grid"] == [1e-3]
    assert len(rows[0]["per_seed"]) == 2 and np.isfinite(rows[0]["mean"])
    assert abs(rows[0]["mean"] - np.log(64)) < 1.0  # two steps from a fresh model: near uniform
    assert "| celo2 | 0.001" in format_table(rows, settings)
    lines = []
    again = evaluate([candidate, Candidate("celo2", "celo2", 3e-3, theta, 20.0)], settings, task, log=lines.append,
                     results_file=results)
    assert "(done before)" in lines[0] and "(done before)" not in lines[1]  # only the new point trained
    assert {p["lr"]: p["mean"] for p in again[0]["points"]}[1e-3] == rows[0]["mean"]
    assert len(json.loads(results.read_text())) == 2


def test_best_point_searches_the_side_multiplier_and_flags_grid_edges():
    task = TinyLM(FamilyConfig(kind="lm", n_layer=1, n_head=1, d_model=8, context_length=8, batch=4, vocab=64))
    settings = EvalSettings(steps=4, seeds=1, val_windows=8)
    candidates = [Candidate("muon", "muon", lr, None, mult, (("consistent_rms", 0.2),))
                  for mult in (1.0, 30.0) for lr in (1e-3, 3e-2)]
    (row,) = evaluate(candidates, settings, task, log=lambda line: None)
    assert row["grid"] == [1e-3, 3e-2] and row["mult_grid"] == [1.0, 30.0] and len(row["points"]) == 4
    assert row["mean"] == min(p["mean"] for p in row["points"])
    assert row["at_edge"]  # a two-point grid: the best point is always on an edge
    assert "at the grid's edge" in format_table([row], settings)


def test_eval_script_default_task_on_a_prepared_corpus(tmp_path):
    """--task default with --corpus: the default recipe's shape on a user's own shards, one tiny point."""
    import subprocess
    import sys
    from pathlib import Path

    from data.prepare import prepare_files

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Line {i}: all the world's a stage, and {i % 5} players." for i in range(3000)))
    prepare_files([text], tmp_path / "shards", text_unit="paragraph", val_fraction=0.1, workers=1, progress=False)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "scripts/eval_optimizer.py", "--task", "default", "--corpus",
                          str(tmp_path / "shards"), "--steps", "2", "--seeds", "1", "--val-windows", "16",
                          "--celo2-lrs", "1e-3", "--adamw-mults", "1", "--no-baselines", "--compilation-cache", ""],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "default task default_recipe_l4_d64_c64 on " + str(tmp_path / "shards") in run.stdout
    assert "| celo2 (normalized_momentum) | 0.001 (0.001) | 1 (1) |" in run.stdout
