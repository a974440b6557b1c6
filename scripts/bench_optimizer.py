"""Time and memory of one optimizer update: AdamW, Muon, Celo2-base and Celo2, in one process.

Workloads are the hidden matrices of a GPT-2 small block (768x2304, 768x768,
768x3072, 3072x768), alone and stacked over 12 layers as the model stores
them. Optimizers are timed round-robin so machine noise hits them alike; the
printed ratios (Celo2-base/AdamW, Celo2/Muon) are what to compare across
machines. Temporary bytes come from XLA's compiled memory analysis.

    python scripts/bench_optimizer.py [--repeats 7] [--layers 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from recipes.experiments.benchmarks import GPT2_SMALL_BLOCK, time_updates
from recipes.optim.theta import init_theta


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=12, help="depth of the stacked workload")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    theta = init_theta(jax.random.key(0))
    workloads = {
        "gpt2-small block": GPT2_SMALL_BLOCK,
        f"stacked x{args.layers}": [(args.layers, *s) for s in GPT2_SMALL_BLOCK],
    }
    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "workloads": {}}
    for label, shapes in workloads.items():
        report["workloads"][label] = timed = time_updates(shapes, args.repeats, theta)
        results, ratios = timed["results"], timed["ratios"]
        n = sum(int(np.prod(s)) for s in shapes)
        print(f"\n{label}: {n:,} parameters on {report['device']} ({report['backend']})")
        print(f"  {'optimizer':<12}{'ms/step':>10}{'ns/param':>10}{'temp B/param':>14}")
        for name, r in results.items():
            print(f"  {name:<12}{r['ms']:>10.2f}{r['ns_per_param']:>10.2f}{r['temp_bytes_per_param_of_largest']:>14.1f}")
        print("  ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
