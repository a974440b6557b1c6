"""Find, for each large recipe, the smallest common TPU slice it fits as shipped.

    python scripts/fit_recipes.py [--recipes gpt3xl_celo2,gpt2_small_adamw] [--out runs/fit_recipes]
                                  [--targets v5e-8,v5p-8,v6e-8,h100-8]

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


COMPILE_TIMEOUT_S = 1800  # Celo2's step compiles about 10x slower for GPUs than for TPUs here


def compile_check(recipe: str, topology: str, out: Path, timeout_s: float = COMPILE_TIMEOUT_S) -> dict:
    """scripts/aot_check.py for one recipe and topology, in its own process: exit, seconds, error, report
    (exit None: stopped after timeout_s)."""
    began = time.perf_counter()
    folder = out / recipe / topology
    try:
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_check.py"), "--config", recipe,
                               "--topology", topology, "--out", str(folder)], capture_output=True, text=True,
                              timeout=timeout_s)
        code, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        code, stderr = None, f"error: compile stopped after {timeout_s:.0f} s"
    seconds = round(time.perf_counter() - began, 1)
    line = next((l for l in stderr.splitlines() if l.startswith("error:")), "")
    print(f"  {recipe} on {topology}: exit {code} in {seconds:.0f} s {line[:160]}", flush=True)
    tried = {"slice": topology, "exit": code, "seconds": seconds, "error": line}
    if code == 0:
        tried["report"] = json.loads((folder / "aot_check.json").read_text())
    return tried


def fit(recipe: str, out: Path, ladder: list[str]) -> dict:
    tried = []
    for slice_name in ladder:
        result = compile_check(recipe, slice_name, out)
        report = result.pop("report", None)
        tried.append(result)
        if report is not None:
            return {"recipe": recipe, "slice": slice_name, "report": report, "tried": tried}
    return {"recipe": recipe, "slice": None, "tried": tried}


def budget_table(results: list[dict], targets: list[str]) -> str:
    """Chip-hours of each recipe's whole run on each target, from the projected step-time range."""
    lines = ["| recipe | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for r in results:
        cells = []
        for target in targets:
            found = r.get("targets", {}).get(target, {})
            cells.append(_chip_hours(found["report"]) if "report" in found else
                         "does not fit" if found.get("exit") == 2 else
                         f"compile stopped after {found['seconds']:.0f} s" if found.get("exit") in (None, -9) else
                         "error" if found else "not compiled")
        lines.append(f"| {r['recipe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--targets", default="", help="also project each recipe on these topologies (e.g. "
                        "v5e-8,v5p-8,v6e-8,h100-8): OUT/budget.md, chip-hours of the whole run on each")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    results = []
    for recipe in [r for r in args.recipes.split(",") if r]:
        saved = args.out / f"{recipe}.json"
        result = json.loads(saved.read_text()) if saved.is_file() else None
        if result is None:
            print(f"{recipe}:", flush=True)
            result = fit(recipe, args.out, args.ladder.split(","))
        known = result.setdefault("targets", {})
        if result.get("slice") and result["slice"] not in known:
            known[result["slice"]] = {"slice": result["slice"], "exit": 0, "report": result["report"]}
        for target in targets:
            if target not in known:
                known[target] = compile_check(recipe, target, args.out)
        saved.write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
        (args.out / "table.md").write_text(table(results))
    (args.out / "table.md").write_text(table(results))
    print(table(results))
    if targets:
        (args.out / "budget.md").write_text(budget_table(results, targets))
        print(budget_table(results, targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
