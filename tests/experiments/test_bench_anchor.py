"""The CPU anchor benchmark times the trainer and the PyTorch reference of the same shape, in one run."""
import json
import math
import os

import pytest

torch = pytest.importorskip("torch")  # the [test] extra installs it; without it these tests skip

from recipes.experiments.benchmarks import median_seconds
from recipes.experiments.torch_reference import ReferenceGPT
from scripts.bench_anchor import main


def test_reference_gpt_has_the_trainers_architecture_and_starts_near_uniform():
    torch.manual_seed(0)
    model = ReferenceGPT(n_layer=1, n_head=2, d_model=16, context_length=8, vocab=64)
    tokens = torch.randint(0, 64, (4, 9))
    loss = model(tokens[:, :-1], tokens[:, 1:]).item()
    assert abs(loss - math.log(64)) < 1.0  # the same check the JAX model's fresh loss passes
    # embeddings, the final LayerNorm, and one GPT-2 block's LayerNorms, attention and MLP (no output matrix: tied)
    assert sum(p.numel() for p in model.parameters()) == 64 * 16 + 8 * 16 + 2 * 16 + (
        2 * 2 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 16 * 64 + 64 + 64 * 16 + 16)


@pytest.mark.slow
def test_bench_anchor_reports_tokens_per_second_and_ratios(tmp_path):
    report = main(["--steps", "1", "--rounds", "1", "--layers", "1", "--heads", "2", "--d-model", "16",
                   "--context", "8", "--batch", "8", "--no-compile", "--json", str(tmp_path / "anchor.json")])
    assert set(report["tokens_per_s"]) == {"trainer", "torch_eager"}
    assert report["shape"]["vocab"] == 50304  # GPT-2's vocabulary padded, as nanoGPT does
    # Every token costs at least the tied output layer's 6 x vocab x d FLOPs (forward and backward), and
    # no CPU core does 5e11 FLOP/s: a rate above that bound timed something other than finished steps.
    most = os.cpu_count() * 5e11 / (6 * 50304 * 16)
    assert all(0 < rate < most for rate in report["tokens_per_s"].values()), (report["tokens_per_s"], most)
    ratio = report["ratios"]["trainer/torch_eager"]
    assert math.isclose(ratio, report["tokens_per_s"]["trainer"] / report["tokens_per_s"]["torch_eager"])
    assert json.loads((tmp_path / "anchor.json").read_text()) == report


def test_median_seconds_times_each_call_after_a_warm_up_and_takes_the_median():
    readings = iter([0.0, 0.01, 1.0, 1.6, 2.0, 2.03])  # the clock around each of three timed calls
    calls = []

    def step():
        calls.append(len(calls))
        return 0

    seconds = median_seconds(step, 3, clock=lambda: next(readings))
    assert len(calls) == 4  # the untimed warm-up, then three timed calls
    assert seconds == pytest.approx(0.03)  # the median of 0.01, 0.6 and 0.03; their mean would be 0.21
