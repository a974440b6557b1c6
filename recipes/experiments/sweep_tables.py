"""A sweep as Markdown: each optimizer's best point and how forgiving it is, then the full grid."""

from __future__ import annotations

import math
import statistics

LR, WD, OPTIMIZER = "optimizer.lr", "optimizer.weight_decay", "optimizer.name"
# A point counts as "near the best" within this many nats of its optimizer's best final loss.
NEAR_BEST = 0.05


def in_grid(row: dict) -> bool:
    """False for an earlier point outside the sweep's current grid (rows read back from
    results.csv say "False"; rows written before the column existed are in the grid)."""
    return str(row.get("in_grid", True)) != "False"


def is_diverged(row: dict) -> bool:
    """Rows come as written (bool) or read back from results.csv ("True"/"False")."""
    return str(row.get("diverged")) == "True"


def final_loss(row: dict) -> float:
    """The row's final validation loss; NaN when it diverged or has none (an unfinished point has none)."""
    value = row.get("final_val_loss")
    if value in (None, "") or is_diverged(row):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    loss = final_loss(row)
    if not math.isnan(loss):
        return f"{loss:.3f}"
    return "div" if is_diverged(row) else "n/a"


def summary_table(rows: list[dict]) -> str:
    """Per optimizer: best final loss and where, and how many grid points land near it."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get(OPTIMIZER, "run")), []).append(row)
    with_target = any(r.get("target_val_loss") not in (None, "") or _steps_to_target(r) is not None for r in rows)
    target_head = " steps to target: fewest (at lr, wd); points reaching it, median |" if with_target else ""
    lines = [f"| optimizer | best final val loss | at lr | at weight decay | points within {NEAR_BEST} of best "
             f"| diverged |{target_head}", "|---|---|---|---|---|---|" + ("---|" if with_target else "")]
    for name, members in groups.items():
        scored = [r for r in members if not math.isnan(final_loss(r))]
        diverged = sum(is_diverged(r) for r in members)
        target_cell = f" {_steps_cell(members)} |" if with_target else ""
        if not scored:
            lines.append(f"| {name} | n/a | | | 0 of {len(members)} | {diverged} |{target_cell}")
            continue
        best = min(scored, key=final_loss)
        near = sum(final_loss(r) <= final_loss(best) + NEAR_BEST for r in scored)
        lines.append(f"| {name} | {final_loss(best):.3f} | {best.get(LR, '')} | {best.get(WD, '')} | "
                     f"{near} of {len(members)} | {diverged} |{target_cell}")
    return "\n".join(lines)


def _steps_to_target(row: dict) -> int | None:
    value = row.get("target_step")
    return None if value in (None, "") else int(float(value))


def _steps_cell(rows: list[dict]) -> str:
    """Fewest steps to train.target_val_loss (and where, when the grid varies lr or wd), how many
    points reached it, and their median: over seeds, the fewest alone flatters."""
    reached = [(steps, r) for r in rows if (steps := _steps_to_target(r)) is not None]
    if not reached:
        return f"not reached (0 of {len(rows)})"
    fewest, best = min(reached, key=lambda pair: pair[0])
    where = f" ({best.get(LR, '')}, {best.get(WD, '')})" if LR in best or WD in best else ""
    median = statistics.median(steps for steps, _ in reached)
    return f"{fewest:,}{where}; {len(reached)} of {len(rows)}, median {median:,g}"


def grid_table(rows: list[dict]) -> str:
    """Final validation loss: one row per (optimizer, weight decay), one column per learning rate."""
    if not rows or LR not in rows[0]:
        return ""
    lrs = sorted({str(r[LR]) for r in rows}, key=float)
    names = list(dict.fromkeys(str(r.get(OPTIMIZER, "")) for r in rows))  # the grid's order
    wds = sorted({str(r.get(WD, "")) for r in rows}, key=lambda v: float(v) if v else 0.0)
    by_cell = {(str(r.get(OPTIMIZER, "")), str(r.get(WD, "")), str(r[LR])): r for r in rows}
    lines = ["| optimizer | weight decay | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
             "|---|---|" + "---|" * len(lrs)]
    for name, wd in ((n, w) for n in names for w in wds):
        cells = " | ".join(_cell(by_cell.get((name, wd, lr))) for lr in lrs)
        lines.append(f"| {name} | {wd} | {cells} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The tables over the current grid; earlier points outside it are only named."""
    grid = [r for r in rows if in_grid(r)]
    text = f"{summary_table(grid)}\n\nFinal validation loss over the grid:\n\n{grid_table(grid)}\n"
    outside = [f"{r['point']} ({r['status']})" for r in rows if not in_grid(r)]
    if outside:
        text += f"\nEarlier points outside the current grid (their rows are in results.csv): {', '.join(outside)}\n"
    return text
