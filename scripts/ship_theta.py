"""Choose a meta-training snapshot by validation and ship it with the package.

    python scripts/ship_theta.py --run runs/metatrain_lm --name celo2_lm --every 50

Trains the validation task (scripts/eval_optimizer.py --task validation) with
every snapshot under RUN/thetas/ (one compilation serves them and every learning
rate; snapshots scripts/plot_metatrain.py already scored with the same settings
are taken from RUN/validation.json), then writes recipes/optim/weights/NAME/ with
theta.state, the run's config.json and provenance.json. NAME is a plain name
(letters, digits, _ and -); a theta already shipped under it is replaced only
with --overwrite. The held-out task stays unseen by the choice: report the
shipped theta with scripts/eval_optimizer.py --theta NAME.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from recipes import messages
from recipes.train.cli import run_main
from data.cache import jax_cache_dir
from recipes.metatrain.evaluate import VALIDATION, EvalSettings, format_table
from recipes.metatrain.progress import scored_snapshots
from recipes.metatrain.ship import WEIGHTS_DIR, describe, score_snapshots, ship, ship_target, snapshots
from recipes.metatrain.tasks.lm import TinyLM


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a meta-training out_dir with thetas/ snapshots")
    p.add_argument("--name", required=True, help="the shipped theta's name (recipes/optim/weights/NAME)")
    p.add_argument("--every", type=int, default=1, help="score only snapshots whose step is a multiple (and the last)")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma-separated Celo2 learning rates; each snapshot gets its best")
    p.add_argument("--adamw-mult", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--overwrite", action="store_true", help="replace a theta already shipped as NAME")
    p.add_argument("--compilation-cache", default=str(jax_cache_dir()),
                   help="JAX's persistent compilation cache (default: %(default)s); '' disables")
    args = p.parse_args(argv)
    messages.setup()
    ship_target(args.name, args.weights_dir, args.overwrite)  # refused before minutes of scoring, not after
    if args.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    paths = snapshots(args.run, args.every)
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    settings = EvalSettings(steps=args.steps, seeds=args.seeds)
    task = TinyLM(VALIDATION)
    known = {step: row for step, row in scored_snapshots(args.run, task, settings, lrs, args.adamw_mult).items()
             if step in paths}
    todo = {step: path for step, path in paths.items() if step not in known}
    print(f"scoring {len(todo)} snapshots of {args.run} on {task.name}"
          + (f" ({len(known)} more already scored in {args.run / 'validation.json'})" if known else ""), flush=True)
    rows = list(known.values())
    if todo:
        rows += score_snapshots(todo, task, settings, lrs, args.adamw_mult)
    print(format_table(rows, settings))
    path = ship(args.run, args.name, rows, paths, describe(settings, task, lrs), args.weights_dir, args.overwrite)
    print(f"shipped {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
