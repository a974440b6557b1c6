"""The held-out evaluation runs and tabulates (a tiny task, two steps)."""
import numpy as np

from recipes.celo2 import normalized_momentum_theta
from recipes.metatrain.config import FamilyConfig
from recipes.metatrain.evaluate import Candidate, EvalSettings, evaluate, format_table
from recipes.metatrain.tasks_lm import TinyLM


def test_evaluate_tabulates_best_lr():
    task = TinyLM(FamilyConfig(kind="lm", n_layer=1, n_head=1, d_model=8, context_length=8, batch=4, vocab=64))
    settings = EvalSettings(steps=2, seeds=2, val_windows=8)
    theta = normalized_momentum_theta()
    rows = evaluate([Candidate("celo2", "celo2", 1e-3, theta, 20.0)], settings, task, log=lambda line: None)
    assert len(rows) == 1 and rows[0]["grid"] == [1e-3]
    assert len(rows[0]["per_seed"]) == 2 and np.isfinite(rows[0]["mean"])
    assert abs(rows[0]["mean"] - np.log(64)) < 1.0  # two steps from a fresh model: near uniform
    assert "| celo2 | 0.001" in format_table(rows, settings)
