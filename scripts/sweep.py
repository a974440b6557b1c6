"""Learning-rate x weight-decay (or any dotted-key) sweeps of train.py.

    python scripts/sweep.py --config shakespeare_celo2.yaml \
        --optimizer.lr=1e-3,3e-3,1e-2 --optimizer.weight_decay=0,0.1 \
        --optimizer.name=celo2,adamw,muon --train.steps=500 --out runs/sweep [--workers 2]
    python scripts/sweep.py --sweep shakespeare_cpu.yaml          # a file in configs/sweeps/

Settings are train.py's overrides, --section.key=value or --section.key value: a value with a
comma outside [], {} and quotes is a swept key and its values (--optimizer.routing.rules=[...] is one list
value), any other is fixed. They replace a sweep file's entry for the same key. Each point is a
normal run directory under --out. Every point's config is checked before any trains (a refused
value is one error line, no point starts); values of a key that give the same settings (1e-3 and
0.001) train once, and a key given twice is refused (give all its values in one).
Rerunning skips finished points and resumes interrupted ones; a rerun with a
changed grid keeps the rows of the earlier points outside it (in_grid False).
One sweep at a time per --out: a second is refused. SIGTERM or Ctrl-C stops the
running points with a checkpoint (the sweep exits 143/130; rerun it to resume);
a killed sweep's training child stops too, and a rerun waits for it to end.
Results go to OUT/results.csv and results.json, plots to OUT/*.png; the last
line counts the finished, unfinished and diverged points. --print-commands
prints one train.py command per point (for a cluster scheduler) and runs
nothing; --wandb-sweep FILE writes the equivalent W&B sweep definition, and
--slurm-array FILE a Slurm job array of those commands (`sbatch FILE`; each
task also runs as `SLURM_ARRAY_TASK_ID=i bash FILE`). When its tasks have
ended, this command without --slurm-array trains nothing that finished and
writes the results table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from model.config_base import ConfigError
from recipes import messages
from recipes.config_parsing import override_pairs
from recipes.train.cli import run_main
from recipes.experiments.sweep_plots import plot_sweep
from recipes.experiments.sweep_tables import in_grid
from recipes.experiments.sweeps import (RECORDS_MISSING, SweepError, SweepStop, commands, make_spec, outcome_line,
                                        run_sweep, wandb_sweep_yaml, write_slurm_array)


def split_values(text: str) -> list[str]:
    """'1e-3, 3e-3' -> ['1e-3', '3e-3']; a comma inside [], {} or quotes does not split: '[1,2]' is one value."""
    values, depth, quote = [""], 0, ""
    for char in text:
        if char == "," and not depth and not quote:
            values.append("")
            continue
        starts_item = not values[-1].strip()
        values[-1] += char
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"" and starts_item:  # as in YAML, a quote opens a string only at its start: it's stays
            quote = char
        else:
            depth = max(0, depth + (char in "[{") - (char in "]}"))
    return [value.strip() for value in values]


def _check_flag(arg: str, rest: list[str]) -> None:
    """A sweep's flags are train.py's --section.key overrides; --grid and --set, which came before
    them, are refused naming the override that replaces them."""
    key, sep, text = arg.removeprefix("--").partition("=")
    if arg.startswith("--") and key in ("grid", "set"):
        given = text if sep else rest[0] if rest and "=" in rest[0] else ""
        override = given.lstrip("-") or "section.key=" + ("v1,v2" if key == "grid" else "value")
        raise SweepError(f"--{key} is gone: write --{override}")
    if not (arg.startswith("--") and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key)):
        raise SweepError(f"unexpected argument {arg!r}; overrides look like --section.key=value, a swept "
                         "key's values separated by commas: --optimizer.lr=1e-3,3e-3")


def split_overrides(args: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """train.py's overrides (--section.key=value or --section.key value) as the swept keys, whose value
    holds more than one item (``split_values``), and the fixed ones. A key given twice is refused:
    train.py takes the later, but in a sweep the earlier may be meant as one of its values."""
    try:
        pairs = override_pairs(args, check_flag=_check_flag)
    except ConfigError as error:
        raise SweepError(str(error)) from None
    swept, fixed = {}, {}
    for key, text in pairs:
        values = split_values(text)
        if key in swept or key in fixed:
            given = ",".join(swept.get(key) or [fixed[key]])
            raise SweepError(f"--{key} is given twice ({given} and {','.join(values)}); give all its values in "
                             f"one: --{key}={given},{','.join(values)}")
        if len(values) == 1:
            fixed[key] = values[0]
        elif all(values):
            swept[key] = values  # repeated values are trained once (see check_points)
        else:
            raise SweepError(f"--{key}={','.join(values)} has an empty value; separate a swept key's values "
                             f"with commas: --{key}=a,b,c")
    return swept, fixed


def main(argv=None, runner=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="base recipe (a path or a name in configs/)")
    parser.add_argument("--sweep", help="sweep file (a path or a name in configs/sweeps/); overrides replace "
                        "its entries")
    parser.add_argument("--out", help="sweep directory")
    parser.add_argument("--workers", type=int, help="points trained at once (default 1)")
    parser.add_argument("--print-commands", action="store_true", help="print train.py commands and exit")
    parser.add_argument("--wandb-sweep", type=Path, metavar="FILE", help="write a W&B sweep YAML and exit")
    parser.add_argument("--slurm-array", type=Path, metavar="FILE", help="write a Slurm job-array script and exit")
    args, overrides = parser.parse_known_args(argv)  # the rest: train.py's --section.key=value overrides
    swept, fixed = split_overrides(overrides)
    messages.setup("stderr")  # the notes of checking the points: stdout may carry --print-commands' commands
    spec = make_spec(config=args.config, swept=swept, fixed=fixed, out=args.out,
                     workers=args.workers, sweep_file=args.sweep)
    if args.print_commands or args.wandb_sweep or args.slurm_array:
        if args.slurm_array:
            write_slurm_array(spec, args.slurm_array)
            print(f"wrote {args.slurm_array}: {len(spec.points())} array tasks; submit it with "
                  f"`sbatch {args.slurm_array}`, then rerun this command without --slurm-array for the results")
        if args.wandb_sweep:
            args.wandb_sweep.write_text(wandb_sweep_yaml(spec))
            print(f"wrote {args.wandb_sweep}: run it with `wandb sweep {args.wandb_sweep}`")
        if args.print_commands:
            print("\n".join(commands(spec)))
        return 0
    messages.setup()  # training: the sweep's progress on stdout
    stop = SweepStop()
    rows = run_sweep(spec, runner=runner, stop=stop)
    grid = [r for r in rows if in_grid(r)]
    for path in plot_sweep(grid, spec.out):
        print(f"wrote {path}")
    print(outcome_line(spec, rows))
    resumable = [r for r in grid if r["status"] in ("interrupted", "pending")]
    if stop.signal_number is not None and resumable:  # exit as the signal would, so a scheduler reruns
        return 128 + stop.signal_number
    return 1 if any(r["status"] in ("failed", RECORDS_MISSING) for r in grid) else 0


if __name__ == "__main__":
    sys.exit(run_main(main, extra=(SweepError,)))
