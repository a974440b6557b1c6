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
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipes.celo2 import init_theta, scale_by_celo2  # noqa: E402

GPT2_SMALL_BLOCK = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]


def optimizers(theta, rank: int) -> dict[str, optax.GradientTransformation]:
    # Muon must be told that a leading layer axis is a batch axis, or it sends 3-D tensors to Adam.
    matrix_axes = optax.contrib.MuonDimensionNumbers(reduction_axis=rank - 2, output_axis=rank - 1)
    return {
        "adamw": optax.adamw(1e-3),
        "muon": optax.contrib.muon(1e-3, muon_weight_dimension_numbers=lambda params: jax.tree.map(lambda _: matrix_axes, params)),
        "celo2_base": optax.chain(scale_by_celo2(theta, orthogonalize=False), optax.scale_by_learning_rate(1e-3)),
        "celo2": optax.chain(scale_by_celo2(theta, orthogonalize=True), optax.scale_by_learning_rate(1e-3)),
    }


def measure(tx, shapes, key) -> dict:
    """Compiles one training-style update (params and state donated, updates applied)."""
    keys = jax.random.split(key, 2 * len(shapes))
    params = [0.02 * jax.random.normal(k, s) for k, s in zip(keys[: len(shapes)], shapes)]
    grads = [jax.random.normal(k, s) for k, s in zip(keys[len(shapes):], shapes)]

    def apply(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(apply, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()
    memory = compiled.memory_analysis()
    largest = max(int(np.prod(s)) for s in shapes)
    holder = {"carry": (params, tx.init(params))}

    def run_once() -> float:
        start = time.perf_counter()
        holder["carry"] = compiled(*holder["carry"], grads)
        jax.block_until_ready(holder["carry"])
        return time.perf_counter() - start

    for _ in range(2):  # warm-up
        run_once()
    return {
        "run_once": run_once,
        "params": sum(int(np.prod(s)) for s in shapes),
        "temp_bytes_per_param_of_largest": memory.temp_size_in_bytes / largest,
    }


def bench(shapes, repeats: int, theta) -> dict[str, dict]:
    rank = len(shapes[0])
    runs = {name: measure(tx, shapes, jax.random.key(0)) for name, tx in optimizers(theta, rank).items()}
    times = {name: [] for name in runs}
    for _ in range(repeats):  # round-robin so slow moments of the machine are shared
        for name, run in runs.items():
            times[name].append(run["run_once"]())
    results = {}
    for name, run in runs.items():
        seconds = statistics.median(times[name])
        results[name] = {
            "ms": 1e3 * seconds,
            "ns_per_param": 1e9 * seconds / run["params"],
            "temp_bytes_per_param_of_largest": run["temp_bytes_per_param_of_largest"],
        }
    return results


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
        results = bench(shapes, args.repeats, theta)
        ratios = {
            "celo2_base/adamw": results["celo2_base"]["ms"] / results["adamw"]["ms"],
            "celo2/muon": results["celo2"]["ms"] / results["muon"]["ms"],
        }
        report["workloads"][label] = {"results": results, "ratios": ratios}
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
