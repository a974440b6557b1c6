"""Compare Celo2 thetas with tuned AdamW and Muon on a held-out small language-modeling task.

    python scripts/eval_optimizer.py --theta runs/metatrain_lm --theta normalized_momentum
    python scripts/eval_optimizer.py --task validation --no-baselines --theta runs/metatrain_lm/thetas/theta_0000100.state ...

Each --theta (a theta.state, a run directory, hf://OWNER/REPO, or a built-in name
such as normalized_momentum or celo2_lm) trains the task with Celo2; AdamW and Muon each get the best of
their learning-rate grid. Prints a Markdown table of final validation losses
(mean, spread and range over seeds). Choose among meta-training snapshots
on ``--task validation``, and report the chosen one on the held-out task.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.metatrain.evaluate import EVAL_TASKS, Candidate, EvalSettings, evaluate, format_table  # noqa: E402
from recipes.metatrain.loop import resolve_theta  # noqa: E402
from recipes.metatrain.tasks_lm import TinyLM  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--theta", action="append", default=None,
                   help="repeatable; default: normalized_momentum")
    p.add_argument("--celo2-lrs", type=_floats, default=[1e-3, 3e-3, 1e-2], help="comma-separated grid")
    p.add_argument("--celo2-adamw-mult", type=float, default=20.0,
                   help="AdamW side LR (embeddings, biases) as a multiple of Celo2's; 20 as in meta-training")
    p.add_argument("--adamw-lrs", type=_floats, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--muon-lrs", type=_floats, default=[3e-3, 1e-2, 3e-2])
    p.add_argument("--muon-adamw-mult", type=float, default=0.3)
    p.add_argument("--no-baselines", action="store_true", help="evaluate the thetas only")
    p.add_argument("--task", choices=sorted(EVAL_TASKS), default="heldout",
                   help="heldout reports; validation selects among snapshots")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--val-windows", type=int, default=256)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--compilation-cache", default="cache/jax",
                   help="JAX's persistent compilation cache (reruns and resumes skip most compiling); '' disables")
    args = p.parse_args(argv)
    if args.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)

    settings = EvalSettings(steps=args.steps, seeds=args.seeds, val_windows=args.val_windows)
    candidates = []
    for source in args.theta or ["normalized_momentum"]:
        theta = resolve_theta(source)
        candidates += [Candidate(f"celo2 ({source})", "celo2", lr, theta, args.celo2_adamw_mult) for lr in args.celo2_lrs]
    if not args.no_baselines:
        candidates += [Candidate("adamw", "adamw", lr) for lr in args.adamw_lrs]
        candidates += [Candidate("muon", "muon", lr, None, args.muon_adamw_mult) for lr in args.muon_lrs]

    family = EVAL_TASKS[args.task]
    task = TinyLM(family)
    print(f"{args.task} task {family.name}: {args.steps} steps, batch {family.batch}, {args.seeds} seeds", flush=True)
    rows = evaluate(candidates, settings, task, log=lambda line: print(line, flush=True))
    print(format_table(rows, settings))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
