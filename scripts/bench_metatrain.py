"""Meta-training speed: outer steps/s, inner steps/s, the learned rule's share, GFLOP/s against a matmul.

    python scripts/bench_metatrain.py                                  # the authors' shape
    python scripts/bench_metatrain.py --config configs/metatrain/lm.yaml --steps 5
    python scripts/bench_metatrain.py --config configs/metatrain/lm_fast.yaml --baseline-config configs/metatrain/lm.yaml
    python scripts/bench_metatrain.py --config configs/metatrain/lm.yaml --steps 5 --pes.particles=4

Any config key (listed below) can be set as --KEY=VALUE, on both configs.

Runs the config's outer steps twice in one process: as meta-training runs now
(families of one shape fused into one population, particles split over the CPU
devices, small tall matrices transposed inside Celo2) and as it ran before
(one population per family on one device, no transposing), and prints the
ratio. ``--baseline-config`` instead compares against another config on the
current path, the two timed in alternating rounds so that load from other
processes falls on both. Achieved GFLOP/s counts XLA's cost analysis of one inner step of every
particle; the matmul peak is a 1024x1024 float32 product timed in the same run.
Nothing is written to the config's out_dir.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from recipes.train.cli import add_config_help, run_main

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "metatrain" / "bench_authors_shape.yaml"


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(lambda x: x @ a)
    x = jax.block_until_ready(f(a))
    start = time.perf_counter()
    for _ in range(repeats):
        x = f(x * 1e-3)
    jax.block_until_ready(x)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_outer_step(trainer, state) -> float:
    """XLA's count for one inner step of every particle (a scan body is counted once), times the truncation."""
    import jax

    from recipes.metatrain.fused import FusedFamilies

    total = 0.0
    for indices, group in trainer.fused(list(range(len(trainer.populations)))):
        one_device = FusedFamilies(group.populations, devices=jax.local_devices()[:1])
        states = tuple(state.populations[n] for n in group.names)
        keys = tuple(jax.random.split(jax.random.key(0), len(states)))
        compiled = one_device.lower(state.theta, states, keys, group.data).compile()
        total += float(compiled.cost_analysis()["flops"]) * trainer.config.pes.truncation
    return total


def timed_steps(trainer, state, steps: int, warmup: int):
    import jax

    start = time.perf_counter()
    for _ in range(warmup):
        state, _ = trainer.outer_step(state)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    start, metrics = time.perf_counter(), None
    for _ in range(steps):
        state, metrics = trainer.outer_step(state)
    jax.block_until_ready(state)
    return state, steps / max(time.perf_counter() - start, 1e-9), compile_s, metrics


def alternating_rates(trainers_states: list, steps: int, rounds: int) -> list[float]:
    """Outer steps/s of each (trainer, state), timed in ``rounds`` alternating rounds."""
    import jax

    states = [state for _, state in trainers_states]
    seconds = [0.0] * len(states)
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for i, (trainer, _) in enumerate(trainers_states):
            start = time.perf_counter()
            for _ in range(per_round):
                states[i], _ = trainer.outer_step(states[i])
            jax.block_until_ready(states[i])
            seconds[i] += time.perf_counter() - start
    return [per_round * rounds / s for s in seconds]


def _meta_config_class() -> type:
    from recipes.metatrain.config import MetaTrainConfig

    return MetaTrainConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False)
    add_config_help(p, _meta_config_class)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--steps", type=int, default=20, help="timed outer steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="outer steps first (compilation)")
    p.add_argument("--cpu-devices", type=int, default=os.cpu_count(), help="CPU devices the particles split over")
    p.add_argument("--no-baseline", action="store_true", help="time the current path only")
    p.add_argument("--baseline-config", default=None,
                   help="compare against this config on the current path (alternating rounds) instead")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds with --baseline-config")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args, overrides = p.parse_known_args(argv)
    from recipes.metatrain.xla_flags import allow_slow_collectives

    allow_slow_collectives()  # a busy machine can keep a device's thread waiting past XLA's 40 s
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from data.cache import jax_cache_dir

    jax.config.update("jax_compilation_cache_dir", str(jax_cache_dir()))  # reruns skip most compiling
    from recipes.optim import celo2
    from recipes.metatrain.config import MetaTrainConfig
    from recipes.metatrain.loop import MetaTrainer

    config = MetaTrainConfig.from_file(args.config, overrides)
    families = config.all_families()
    inner_per_outer = len(families) * config.pes.particles * config.pes.truncation
    print(f"{args.config}: {len(families)} families x {config.pes.particles} particles x "
          f"{config.pes.truncation} steps = {inner_per_outer} inner steps per outer step", flush=True)

    peak = matmul_gflops()
    results = {"config": args.config, "inner_steps_per_outer_step": inner_per_outer, "matmul_gflops": peak,
               "devices": len(jax.local_devices())}
    trainer = MetaTrainer(config)  # its messages are not shown: messages.setup() is not called
    state = trainer.fresh_state(trainer.initial_theta())
    alternate = bool(args.baseline_config) and not args.no_baseline  # then timed below, with the baseline
    state, rate, compile_s, _ = timed_steps(trainer, state, 0 if alternate else args.steps, args.warmup)
    profile = trainer.profile(state)
    flops = flops_per_outer_step(trainer, state)
    results["current"] = {"outer_steps_per_s": rate, "inner_steps_per_s": rate * inner_per_outer,
                          "compile_and_warmup_s": compile_s, "rule_share": profile["rule_share"],
                          "gflop_per_outer_step": flops / 1e9, "achieved_gflops": flops * rate / 1e9}
    if alternate:
        base_config = MetaTrainConfig.from_file(args.baseline_config, overrides)
        base_inner = len(base_config.all_families()) * base_config.pes.particles * base_config.pes.truncation
        before = MetaTrainer(base_config)
        base_state, _, compile0, _ = timed_steps(before, before.fresh_state(before.initial_theta()), 0, args.warmup)
        rate, rate0 = alternating_rates([(trainer, state), (before, base_state)], args.steps, args.rounds)
        results["current"].update(outer_steps_per_s=rate, inner_steps_per_s=rate * inner_per_outer,
                                  achieved_gflops=flops * rate / 1e9)
        flops0 = flops_per_outer_step(before, base_state)
        results["before"] = {"config": args.baseline_config, "outer_steps_per_s": rate0,
                             "inner_steps_per_s": rate0 * base_inner, "compile_and_warmup_s": compile0,
                             "gflop_per_outer_step": flops0 / 1e9}
        results["speedup"] = rate / rate0
    elif not args.no_baseline:
        saved = celo2.TRANSPOSE_BELOW
        celo2.TRANSPOSE_BELOW = 0
        try:
            before = MetaTrainer(config, fuse=False, devices=jax.local_devices()[:1])
            _, rate0, compile0, _ = timed_steps(before, before.fresh_state(before.initial_theta()), args.steps,
                                                args.warmup)
        finally:
            celo2.TRANSPOSE_BELOW = saved
        results["before"] = {"outer_steps_per_s": rate0, "inner_steps_per_s": rate0 * inner_per_outer,
                             "compile_and_warmup_s": compile0}
        results["speedup"] = rate / rate0

    cur = results["current"]
    print(f"matmul peak (1024^2 float32, {results['devices']} device(s) available): {peak:.1f} GFLOP/s")
    print(f"current: {cur['outer_steps_per_s']:.3f} outer steps/s, {cur['inner_steps_per_s']:,.0f} inner steps/s, "
          f"learned rule {100 * cur['rule_share']:.0f}% of unroll time, {cur['gflop_per_outer_step']:.1f} GFLOP per "
          f"outer step = {cur['achieved_gflops']:.1f} GFLOP/s ({100 * cur['achieved_gflops'] / peak:.0f}% of the "
          f"matmul), compile+warmup {cur['compile_and_warmup_s']:.0f} s")
    if "before" in results:
        b = results["before"]
        extra = f", {b['gflop_per_outer_step']:.1f} GFLOP per outer step ({b['config']})" if "config" in b else ""
        print(f"before:  {b['outer_steps_per_s']:.3f} outer steps/s, {b['inner_steps_per_s']:,.0f} inner steps/s, "
              f"compile+warmup {b['compile_and_warmup_s']:.0f} s{extra}")
        print(f"speedup: {results['speedup']:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
