"""The CPU anchor benchmark times the trainer and the PyTorch reference of the same shape, in one run."""
import math

import torch

from recipes.experiments.benchmarks import median_seconds
from recipes.experiments.torch_reference import ReferenceGPT, reference_step
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


def test_bench_anchor_reports_tokens_per_second_and_ratios(tmp_path):
    report = main(["--steps", "1", "--rounds", "1", "--layers", "1", "--heads", "2", "--d-model", "16",
                   "--context", "8", "--batch", "8", "--no-compile", "--json", str(tmp_path / "anchor.json")])
    assert set(report["tokens_per_s"]) == {"trainer", "torch_eager"}
    assert all(rate > 0 for rate in report["tokens_per_s"].values())
    ratio = report["ratios"]["trainer/torch_eager"]
    assert math.isclose(ratio, report["tokens_per_s"]["trainer"] / report["tokens_per_s"]["torch_eager"])
    assert report["shape"]["vocab"] == 50304  # GPT-2's vocabulary padded, as nanoGPT does
    assert (tmp_path / "anchor.json").is_file()
    assert median_seconds(reference_step(1, 2, 16, 8, 64, 2, compile=False), 2) > 0
