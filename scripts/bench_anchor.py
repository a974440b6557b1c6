"""The trainer's CPU speed at nanoGPT's reference shape, against a PyTorch GPT of that shape.

    python scripts/bench_anchor.py [--steps 5] [--no-compile] [--json out.json]

One process measures, one after the other and in rounds so machine noise hits
them alike: the trainer's fused train step (AdamW, random tokens), the same
architecture in PyTorch eager, and under torch.compile. Prints tokens/s and the
trainer's ratio to each; the target is at least 1.0 against compiled. The shape
is nanoGPT's CPU reference: 4 layers, 4 heads, d=256, context 256, batch 16,
GPT-2's vocabulary padded to 50,304, tied output layer; the trainer unrolls the
4 layers (`model.unroll_layers`) unless --scan-layers is given.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax

from recipes.experiments.benchmarks import TrainingSetup, median_seconds
from recipes.experiments.torch_reference import reference_step
from recipes.train.cli import run_main
from recipes.train.config import load_config


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (trainer, eager, compiled)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--scan-layers", action="store_true",
                        help="run the layers as one lax.scan (ModelConfig's default) instead of unrolled")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it needs a C++ compiler)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    config = load_config(None, [f"--model.n_layer={args.layers}", f"--model.n_head={args.heads}",
                                f"--model.d_model={args.d_model}", f"--model.context_length={args.context}",
                                f"--data.seq_len={args.context}", f"--data.global_batch={args.batch}",
                                f"--model.unroll_layers={not args.scan_layers}",
                                "--optimizer.name=adamw", "--train.steps=1000"])
    setup = TrainingSetup(config, synthetic=True)
    state, tokens = {"state": setup.init()}, setup.batch(0)

    def trainer_step():
        state["state"], metrics = setup.train_step(state["state"], tokens)
        return metrics

    shape = dict(n_layer=args.layers, n_head=args.heads, d_model=args.d_model, context_length=args.context,
                 vocab=config.model.padded_vocab_size, batch=args.batch)
    steps = {"trainer": trainer_step, "torch_eager": reference_step(**shape, compile=False)}
    if not args.no_compile:
        steps["torch_compiled"] = reference_step(**shape, compile=True)  # compiled once, timed every round
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(median_seconds(step, args.steps))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in seconds.items()),
              flush=True)
    tokens_per_step = args.batch * args.context
    tokens_per_s = {k: tokens_per_step / statistics.median(v) for k, v in seconds.items()}
    report = {"device": jax.devices()[0].device_kind, "shape": shape, "unroll_layers": not args.scan_layers,
              "tokens_per_s": tokens_per_s,
              "ratios": {f"trainer/{k}": tokens_per_s["trainer"] / v for k, v in tokens_per_s.items()
                         if k != "trainer"}}
    for name, rate in tokens_per_s.items():
        print(f"{name:>15}: {rate:8,.0f} tokens/s")
    print("ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in report["ratios"].items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    raise SystemExit(run_main(main))
