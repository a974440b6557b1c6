"""Plots of a finished (or partial) sweep: python scripts/plot_sweep.py SWEEP_DIR

Reads SWEEP_DIR/results.json (rewritten from the run directories first, so a
sweep still in progress can be plotted) and writes heatmap_final_val_loss.png
and loss_vs_lr.png beside it, with results.md (the best point of each optimizer,
how many points land near it, and the whole grid as a table). Earlier points
outside the sweep's current grid keep their rows in results.csv, not in the plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recipes.train.cli import run_main
from recipes.experiments.sweep_plots import plot_sweep
from recipes.experiments.sweep_tables import in_grid, summary_table
from recipes.experiments.sweeps import SweepSpec, collect, outcome_line, write_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    spec_path = args.sweep_dir / "sweep.json"
    if not spec_path.is_file():
        parser.error(f"{args.sweep_dir} is not a sweep directory (no sweep.json); run scripts/sweep.py first")
    saved = json.loads(spec_path.read_text())
    spec = SweepSpec(config=saved["config"], grid=saved["grid"], overrides=saved["set"], out=args.sweep_dir,
                     earlier_grids=tuple(saved.get("earlier_grids", [])))
    rows = collect(spec)
    write_results(spec, rows)
    grid = [r for r in rows if in_grid(r)]
    for path in plot_sweep(grid, args.sweep_dir):
        print(f"wrote {path}")
    print(f"wrote {args.sweep_dir / 'results.md'}\n\n{summary_table(grid)}\n\n{outcome_line(spec, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
