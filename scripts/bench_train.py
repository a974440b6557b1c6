"""Training throughput of a recipe: tokens/s and a step-time breakdown.

    python scripts/bench_train.py --config gpt2_small_adamw [--steps 10] [--synthetic] [--section.key=value ...]

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
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import make_loss_fn  # noqa: E402
from recipes import config as config_lib  # noqa: E402
from recipes import mesh as mesh_lib  # noqa: E402
from recipes.metrics import mfu  # noqa: E402
from recipes.optimizers import build_optimizer  # noqa: E402
from recipes.train_step import (abstract_model, accumulated_grads, init_state,  # noqa: E402
                                make_train_step, params_shardings, state_shardings)


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe: a path or a name in configs/")
    parser.add_argument("--steps", type=int, default=5, help="timed repeats of each part")
    parser.add_argument("--synthetic", action="store_true", help="random tokens instead of the data")
    args, overrides = parser.parse_known_args(argv)
    config = config_lib.load_config(args.config, overrides)
    mesh_lib.init_distributed(config.mesh)
    mesh = mesh_lib.build_mesh(config.mesh)
    accum, seq_len = config.data.accum_steps, config.seq_len
    mesh_lib.check_batch(config.data.global_batch, config.data.global_batch // accum, mesh)

    graphdef, params_abstract = abstract_model(config.model)
    tx, _ = build_optimizer(config.optimizer, params_abstract, total_steps=config.train.steps)
    shardings = state_shardings(tx, params_abstract, params_shardings(config.model, mesh), mesh)
    state = init_state(config.model, tx, config.train.seed, mesh, shardings)
    loss_fn = make_loss_fn(graphdef)
    batch_sh = mesh_lib.batch_sharding(mesh)

    local_rows = config.data.global_batch // jax.process_count()
    if args.synthetic:
        rng = np.random.default_rng(0)
        def host_batch(step):
            return rng.integers(0, config.model.vocab_size, (local_rows, seq_len + 1), dtype=np.int32)
    else:
        from data.loader import TokenLoader
        from train import data_directory
        loader = TokenLoader.open(data_directory(config.data.path), seq_len=seq_len,
                                  global_batch=config.data.global_batch, seed=config.train.seed,
                                  vocab_size=config.model.vocab_size)
        host_batch = loader.train_batch
    counter = iter(range(10**9))
    tokens = mesh_lib.global_batch_array(host_batch(0), mesh)

    with jax.set_mesh(mesh):
        grads_fn = jax.jit(accumulated_grads(loss_fn, accum), in_shardings=(shardings["params"], batch_sh))
        _, grads = grads_fn(state["params"], tokens)

        @jax.jit
        def optimizer_step(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        train_step = make_train_step(loss_fn, tx, accum_steps=accum, shardings=shardings, batch_sharding=batch_sh)
        times = {
            "data": median_seconds(lambda: mesh_lib.global_batch_array(host_batch(next(counter)), mesh), args.steps),
            "fwd_bwd": median_seconds(lambda: grads_fn(state["params"], tokens), args.steps),
            "optimizer": median_seconds(lambda: optimizer_step(state["params"], state["opt_state"], grads), args.steps),
        }
        holder = {"state": state}

        def full_step():
            holder["state"], metrics = train_step(holder["state"], tokens)
            return metrics
        times["step"] = median_seconds(full_step, args.steps)

    tokens_per_s = config.tokens_per_step / times["step"]
    report = {
        "config": args.config, "optimizer": config.optimizer.name, "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind, "mesh": mesh_lib.describe(mesh),
        "tokens_per_step": config.tokens_per_step, "grad_accum_steps": accum,
        "seconds": {k: round(v, 6) for k, v in times.items()},
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": mfu(tokens_per_s, config.model, seq_len, list(mesh.devices.flat)),
    }
    if jax.process_index() == 0:
        for part in ("data", "fwd_bwd", "optimizer", "step"):
            print(f"{part:>10}: {times[part] * 1e3:9.2f} ms")
        print(f"{'tokens/s':>10}: {tokens_per_s:,.0f}" + (f"  (MFU {report['mfu']:.1%})" if report["mfu"] else ""))
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
