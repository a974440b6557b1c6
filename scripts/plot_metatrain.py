"""Meta-training progress: meta-loss and validation-task loss against outer step, with references.

    python scripts/plot_metatrain.py --run runs/celo2_repro --out configs/metatrain/celo2_repro_results/curve.png

Trains the validation task (the one scripts/ship_theta.py chooses by) with
every snapshot not scored yet and with the starting theta (step 0), keeping
the scores in RUN/validation.json, then draws meta-loss (top) and validation
loss (bottom) with lines for normalized_momentum, AdamW and Muon at the best
of their learning-rate grids.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from recipes.train.cli import run_main
from data.cache import jax_cache_dir
from recipes.metatrain.evaluate import VALIDATION, EvalSettings
from recipes.metatrain.progress import plot, update_scores
from recipes.metatrain.tasks_lm import TinyLM


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a meta-training out_dir")
    p.add_argument("--out", type=Path, default=None, help="the PNG (default RUN/curve.png)")
    p.add_argument("--every", type=int, default=1, help="score only snapshots whose step is a multiple (and the last)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--adamw-mult", type=float, default=20.0, help="Celo2's AdamW-side multiplier")
    p.add_argument("--compilation-cache", default=str(jax_cache_dir()),
                   help="JAX's persistent compilation cache (default: %(default)s); '' disables")
    args = p.parse_args(argv)
    if not (args.run / "config.json").is_file():
        p.error(f"{args.run} is not a meta-training run directory (no config.json)")
    if args.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    record = update_scores(args.run, TinyLM(VALIDATION), EvalSettings(steps=args.steps, seeds=args.seeds),
                           args.adamw_mult, args.every, log=lambda line: print(line, flush=True))
    out = plot(args.run, record, args.out or args.run / "curve.png")
    print(f"wrote {out} ({len(record['snapshots'])} points scored; scores in {args.run / 'validation.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
