"""Training throughput of a recipe: tokens/s and a step-time breakdown.

    python scripts/bench_train.py --config gpt2_small_adamw --steps 10 --synthetic
    python scripts/bench_train.py --config shakespeare_celo2 --steps 3 --data.global_batch=8

Any config key (listed below) can be set as --KEY=VALUE.

Times, each as the median over --steps runs after a compile/warm-up run:
  data       reading one global batch on the host and placing it on the devices
  fwd+bwd    loss and gradients (all micro-batches)
  optimizer  the optax update and applying it
  step       the whole jitted train step (what train.py runs; fwd+bwd and optimizer fused)
--synthetic uses random tokens, so no prepared data is needed.
"""
from __future__ import annotations

import argparse
import json

import jax

from recipes.train.cli import add_config_help, run_main
from recipes.train import config as config_lib
from recipes.train import cluster
from recipes.experiments.benchmarks import TrainingSetup, time_training


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    add_config_help(parser, lambda: config_lib.Config)
    parser.add_argument("--config", help="YAML recipe: a path or a name in configs/")
    parser.add_argument("--steps", type=int, default=5, help="timed repeats of each part")
    parser.add_argument("--synthetic", action="store_true", help="random tokens instead of the data")
    args, overrides = parser.parse_known_args(argv)
    config = config_lib.load_config(args.config, overrides)
    cluster.start(config.mesh)
    report = {"config": args.config, **time_training(TrainingSetup(config, synthetic=args.synthetic), args.steps)}
    if jax.process_index() == 0:
        for part in ("data", "fwd_bwd", "optimizer", "step"):
            print(f"{part:>10}: {report['seconds'][part] * 1e3:9.2f} ms")
        print(f"{'tokens/s':>10}: {report['tokens_per_s']:,.0f}"
              + (f"  (MFU {report['mfu']:.1%})" if report["mfu"] else ""))
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    raise SystemExit(run_main(main))
