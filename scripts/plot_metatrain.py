"""Meta-training progress: meta-loss and task losses against outer step, with references.

    python scripts/plot_metatrain.py --run runs/celo2_repro --out runs/celo2_repro/curve.png
    python scripts/plot_metatrain.py --run runs/metatrain_lm_long --task validation --task heldout --every 1000

Trains each --task (default: validation, the one scripts/ship_theta.py chooses
by) with every snapshot not scored yet and with the starting theta (step 0),
keeping the scores in RUN/TASK.json, then draws meta-loss (top) and one panel
per task scored so far, with lines for normalized_momentum, AdamW and Muon at
the best of their learning-rate grids.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipes import messages
from recipes.train.cli import run_main
from data.cache import jax_cache_dir
from recipes.metatrain.evaluate import EVAL_TASKS, EvalSettings
from recipes.metatrain.progress import plot, update_scores
from recipes.metatrain.tasks.lm import TinyLM


ADAMW_MULTS = {"validation": 20.0, "heldout": 10.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a meta-training out_dir")
    p.add_argument("--out", type=Path, default=None, help="the PNG (default RUN/curve.png)")
    p.add_argument("--every", type=int, default=1, help="score only snapshots whose step is a multiple (and the last)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--task", action="append", choices=("validation", "heldout"), default=None,
                   help="repeatable; default: validation")
    p.add_argument("--adamw-mult", type=float, default=None,
                   help="Celo2's AdamW-side multiplier (default: 20 on validation, 10 on heldout, "
                   "the fair table's best there)")
    p.add_argument("--compilation-cache", default=str(jax_cache_dir()),
                   help="JAX's persistent compilation cache (default: %(default)s); '' disables")
    args = p.parse_args(argv)
    if not (args.run / "config.json").is_file():
        p.error(f"{args.run} is not a meta-training run directory (no config.json)")
    if args.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    messages.setup()
    settings = EvalSettings(steps=args.steps, seeds=args.seeds)
    for task in args.task or ["validation"]:
        mult = args.adamw_mult if args.adamw_mult is not None else ADAMW_MULTS[task]
        update_scores(args.run, TinyLM(EVAL_TASKS[task]), settings, mult, args.every, scores_file=f"{task}.json")
    records = [json.loads((args.run / f"{task}.json").read_text())
               for task in ADAMW_MULTS if (args.run / f"{task}.json").is_file()]
    out = plot(args.run, records, args.out or args.run / "curve.png")
    counts = ", ".join(f"{len(record['snapshots'])} on {record['task']}" for record in records)
    print(f"wrote {out} (points scored: {counts}; scores in {args.run}/TASK.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
