"""Pictures of a learning-rate x weight-decay sweep: heatmaps per optimizer and loss versus learning rate."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from recipes.experiments.sweep_tables import LR, OPTIMIZER, WD, is_diverged  # noqa: E402
from recipes.experiments.sweep_tables import final_loss as _loss  # noqa: E402


def _number(text) -> float:
    return float(text)


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get(OPTIMIZER, "")), []).append(row)
    return groups


def heatmaps(rows: list[dict], path: Path) -> Path | None:
    """Final validation loss over (lr, weight decay), one panel per optimizer; diverged ("div") and
    missing ("n/a") cells grey."""
    if not rows or LR not in rows[0] or WD not in rows[0]:
        return None
    groups = _groups(rows)
    lrs = sorted({_number(r[LR]) for r in rows})
    wds = sorted({_number(r[WD]) for r in rows})
    finite = [_loss(r) for r in rows if not math.isnan(_loss(r))]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for k, (ax, (name, members)) in enumerate(zip(axes[0], groups.items())):
        grid = np.full((len(wds), len(lrs)), np.nan)
        labels = np.full(grid.shape, "n/a", dtype=object)  # never ran, failed to start, or still pending
        for r in members:
            cell = wds.index(_number(r[WD])), lrs.index(_number(r[LR]))
            grid[cell] = _loss(r)
            if is_diverged(r):
                labels[cell] = "div"
        cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="lightgrey")  # diverged or missing points
        image = ax.imshow(grid, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            dark = not math.isnan(value) and value > (vmin + vmax) / 2
            ax.text(j, i, labels[i, j] if math.isnan(value) else f"{value:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
        ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], rotation=45)
        ax.set_yticks(range(len(wds)), [f"{v:g}" for v in wds])
        ax.set_xlabel("learning rate")
        if k == 0:  # the panels share their axes; a label on each would overlap the next panel's ticks
            ax.set_ylabel("weight decay")
        ax.set_title(name or "final validation loss")
    fig.colorbar(image, ax=axes[0].tolist(), label="final validation loss")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_vs_lr(rows: list[dict], path: Path) -> Path | None:
    """Best final validation loss over weight decays at each learning rate, one line per optimizer."""
    if not rows or LR not in rows[0]:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, members in _groups(rows).items():
        best: dict[float, float] = {}
        for r in members:
            lr, loss = _number(r[LR]), _loss(r)
            previous = best.get(lr, math.nan)
            best[lr] = loss if math.isnan(previous) or loss < previous else previous
        lrs = sorted(best)
        ax.plot(lrs, [best[lr] for lr in lrs], marker="o", label=name or "run")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (best weight decay)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_sweep(rows: list[dict], out_dir: Path) -> list[Path]:
    written = [heatmaps(rows, out_dir / "heatmap_final_val_loss.png"), loss_vs_lr(rows, out_dir / "loss_vs_lr.png")]
    return [p for p in written if p is not None]
