"""Find, for each large recipe, the smallest common TPU slice it fits as shipped.

    python scripts/fit_recipes.py [--recipes gpt3xl_celo2,gpt2_small_adamw] [--out runs/fit_recipes]

Runs scripts/aot_check.py (one process per compile) up a ladder of slices, smallest memory
first, and stops at the first that fits. Results are kept per recipe in OUT/RECIPE.json
(a rerun skips recipes already answered), and OUT/table.md is the table for the docs:
recipe, slice, peak GiB per device, the projected step time, tokens/s and MFU (ranges, from
recipes.experiments.hlo_roofline), the chip-hours of the recipe's whole run, compile time here.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LADDER = ["v5e-8", "v6e-8", "v5p-8", "v5e-16", "v6e-16", "v5p-16", "v5p-32"]  # by memory per slice
LARGE = [f"{size}_{opt}" for size in ("gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl", "gpt3xl")
         for opt in ("adamw", "muon", "celo2")] + [f"gpt2_small_track3_{opt}" for opt in ("adamw", "muon", "celo2")]


def fit(recipe: str, out: Path, ladder: list[str]) -> dict:
    tried = []
    for slice_name in ladder:
        began = time.perf_counter()
        folder = out / recipe / slice_name
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_check.py"), "--config", recipe,
                               "--topology", slice_name, "--out", str(folder)],
                              capture_output=True, text=True)
        seconds = round(time.perf_counter() - began, 1)
        line = next((l for l in done.stderr.splitlines() if l.startswith("error:")), "")
        tried.append({"slice": slice_name, "exit": done.returncode, "seconds": seconds, "error": line})
        print(f"  {recipe} on {slice_name}: exit {done.returncode} in {seconds:.0f} s {line[:160]}", flush=True)
        if done.returncode == 0:
            report = json.loads((folder / "aot_check.json").read_text())
            return {"recipe": recipe, "slice": slice_name, "report": report, "tried": tried}
    return {"recipe": recipe, "slice": None, "tried": tried}


def table(results: list[dict]) -> str:
    lines = ["| recipe | smallest slice that fits | peak per device | of HBM | projected step | tokens/s | MFU "
             "| chip-hours for the recipe's tokens | compile on the 2-core CPU | smaller slices tried |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        smaller = ", ".join(f"{t['slice']} ({'out of memory' if t['exit'] == 2 else 'error'})"
                            for t in r["tried"] if t["exit"] != 0) or "-"
        if r["slice"] is None:
            lines.append(f"| {r['recipe']} | none up to {LADDER[-1]} | | | | | | | | {smaller} |")
            continue
        rep = r["report"]
        lines.append(f"| {r['recipe']} | {r['slice']} | {rep['bytes_per_device']['peak'] / 2**30:.1f} GiB | "
                     f"{rep['peak_share_of_hbm']:.0%} | {_range(rep, 'step_s_range', 1e3, '{:,.0f}')} ms | "
                     f"{_range(rep, 'tokens_per_s_range', 1e-3, '{:,.0f}')}K | {_range(rep, 'mfu_range', 100, '{:.0f}')}% | "
                     f"{_chip_hours(rep)} | {rep['compile_s']:.0f} s | {smaller} |")
    return "\n".join(lines) + "\n"


def _range(report: dict, key: str, scale: float, fmt: str) -> str:
    low, high = report["projection"][key]
    return f"{fmt.format(low * scale)}-{fmt.format(high * scale)}"


def _chip_hours(report: dict) -> str:
    """The recipe's whole run (train.steps) at the projected step times, in chip-hours."""
    low, high = (report["train_steps"] * s * report["devices"] / 3600 for s in report["projection"]["step_s_range"])
    return f"{low:,.0f}-{high:,.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(LARGE), help="comma-separated recipe names")
    parser.add_argument("--out", type=Path, default=Path("runs/fit_recipes"))
    parser.add_argument("--ladder", default=",".join(LADDER), help="slices to try, in order")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for recipe in [r for r in args.recipes.split(",") if r]:
        saved = args.out / f"{recipe}.json"
        if saved.is_file():
            results.append(json.loads(saved.read_text()))
            continue
        print(f"{recipe}:", flush=True)
        result = fit(recipe, args.out, args.ladder.split(","))
        saved.write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
        (args.out / "table.md").write_text(table(results))
    (args.out / "table.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
