"""Compare Celo2 thetas with tuned AdamW and Muon on a held-out small language-modeling task.

    python scripts/eval_optimizer.py --theta runs/metatrain_lm --theta normalized_momentum
    python scripts/eval_optimizer.py --task validation --no-baselines --theta runs/metatrain_lm/thetas/theta_0000100.state ...
    python scripts/eval_optimizer.py --task default --screen-seeds 1 --theta celo2_lm --corpus my_shards

Each --theta (a theta.state, a run directory, hf://OWNER/REPO, or a built-in name
such as normalized_momentum or celo2_lm) trains the task with Celo2; AdamW and Muon each get the best of
their learning-rate grid; Celo2 and Muon also search the AdamW-side (embeddings,
biases, LayerNorm) learning-rate multiplier over --adamw-mults. Prints a Markdown
table of final validation losses (mean, spread and range over seeds), flagging a
best point on an edge of its grid (--extend-edges steps past it first). Choose among meta-training snapshots on
``--task validation``, and report the chosen one on the held-out task; ``--task
default`` is the default recipe's model, batch, schedule and GPT-2 vocabulary (read from its YAML),
on the bundled corpus or on a shard directory from data.prepare (--corpus).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import yaml

from recipes import messages
from recipes.train.cli import run_main
from data.cache import jax_cache_dir
from recipes.metatrain.evaluate import (
    EVAL_TASKS, Candidate, EvalSettings, default_recipe_task, evaluate, format_table,
)
from recipes.optim.theta import resolve_theta
from recipes.metatrain.tasks.lm import TinyLM


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--theta", action="append", default=None,
                   help="repeatable; default: normalized_momentum")
    p.add_argument("--celo2-lrs", type=_floats, default=[1e-3, 3e-3, 1e-2], help="comma-separated grid")
    p.add_argument("--adamw-mults", type=_floats, default=[1.0, 3.0, 10.0],
                   help="AdamW-side LR (embeddings, biases) multipliers tried for Celo2 and Muon, e.g. 1,3,10,20")
    p.add_argument("--adamw-lrs", type=_floats, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--muon-lrs", type=_floats, default=[3e-3, 1e-2, 3e-2])
    p.add_argument("--muon", action="append", default=[], metavar="KEY=VALUE",
                   help="a Muon setting for an extra Muon row, e.g. consistent_rms=1.0 or beta=0.9 (repeatable)")
    p.add_argument("--corpus", default="", help="a shard directory from data.prepare (default: the bundled corpus)")
    p.add_argument("--no-baselines", action="store_true", help="evaluate the thetas only")
    p.add_argument("--task", choices=sorted(EVAL_TASKS), default="heldout",
                   help="heldout reports; validation selects among snapshots")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's steps for --task default, else 300")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--screen-seeds", type=int, default=None,
                   help="search the grid with this many seeds, then train each best point with --seeds")
    p.add_argument("--extend-edges", type=int, default=1,
                   help="step a best point on a grid edge out by one grid ratio, up to this many times per axis")
    p.add_argument("--val-windows", type=int, default=256)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--results", type=Path, default=None,
                   help="a JSON file keeping every finished point: rerunning skips them (a long table resumes)")
    p.add_argument("--compilation-cache", default=str(jax_cache_dir()),
                   help="JAX's persistent compilation cache (reruns and resumes skip most compiling; "
                   "default: %(default)s); '' disables")
    args = p.parse_args(argv)
    if args.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)

    family, task_settings = EVAL_TASKS[args.task], {"steps": 300}
    if args.task == "default":
        family, task_settings = default_recipe_task()
    if args.steps is not None:
        task_settings["steps"] = args.steps
    settings = EvalSettings(seeds=args.seeds, val_windows=args.val_windows, **task_settings)
    muon_variant = []
    for item in args.muon:
        key, _, value = item.partition("=")
        muon_variant.append((key, yaml.safe_load(value)))
    candidates = []
    for source in args.theta or ["normalized_momentum"]:
        theta = resolve_theta(source, setting="--theta")
        candidates += [Candidate(f"celo2 ({source})", "celo2", lr, theta, mult)
                       for mult in args.adamw_mults for lr in args.celo2_lrs]
    if not args.no_baselines:
        candidates += [Candidate("adamw", "adamw", lr) for lr in args.adamw_lrs]
        candidates += [Candidate("muon", "muon", lr, None, mult) for mult in args.adamw_mults for lr in args.muon_lrs]
    if muon_variant:
        label = "muon (" + ", ".join(f"{k}={v}" for k, v in muon_variant) + ")"
        candidates += [Candidate(label, "muon", lr, None, mult, tuple(muon_variant))
                       for mult in args.adamw_mults for lr in args.muon_lrs]

    family = dataclasses.replace(family, corpus=args.corpus)
    task = TinyLM(family)
    print(f"{args.task} task {family.name} on {args.corpus or 'the bundled corpus'}: {settings.steps} steps, "
          f"batch {family.batch}, {args.seeds} seeds" + (f" (grid searched with {args.screen_seeds})"
                                                   if args.screen_seeds else ""), flush=True)
    messages.setup()
    rows = evaluate(candidates, settings, task, results_file=args.results, screen_seeds=args.screen_seeds,
                    extend_edges=args.extend_edges)
    print(format_table(rows, settings))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
