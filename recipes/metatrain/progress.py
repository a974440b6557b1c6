"""What meta-training buys: meta-loss and the validation task's loss against outer step.

Snapshot scores are kept in ``RUN/validation.json`` and only new snapshots
are trained, so the curve can be refreshed while a run goes on. The
reference lines are the hand-made ``normalized_momentum`` theta, AdamW and
Muon on the same task, each at the best of its learning-rate grid.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from recipes.optim.theta import load_checkpoint, theta_from_source
from model.config_base import ConfigError
from data.files import write_json
from recipes.metatrain.evaluate import Candidate, EvalSettings, evaluate
from recipes.metatrain.ship import snapshots
from recipes.metatrain.tasks.lm import TinyLM

ZOOM = 0.3  # nats above the best score that a panel's y-axis shows
SCORES_FILE = "validation.json"  # what shipping chooses by; other tasks' scores sit beside it as TASK.json
CELO2_LRS = (1e-3, 3e-3, 1e-2)
REFERENCE_GRIDS = {"adamw": (1e-3, 3e-3, 1e-2, 3e-2), "muon": (3e-3, 1e-2, 3e-2, 1e-1)}


def update_scores(run_dir: Path, task: TinyLM, settings: EvalSettings, adamw_lr_mult: float = 20.0,
                  every: int = 1, celo2_lrs=CELO2_LRS, reference_grids=REFERENCE_GRIDS,
                  scores_file: str = SCORES_FILE) -> dict:
    """Scores the snapshots (and the starting theta, as step 0) not scored yet into RUN/scores_file;
    returns the whole record."""
    path = run_dir / scores_file
    record = json.loads(path.read_text()) if path.is_file() else {"snapshots": {}, "references": {}}
    key = f"{task.name}/{settings.steps}x{settings.seeds}"
    scored_with = {"settings": dataclasses.asdict(settings), "celo2_lrs": list(celo2_lrs),
                   "adamw_lr_mult": adamw_lr_mult}
    if record.get("task") not in (None, key) or any(record.get(k, v) != v for k, v in scored_with.items()):
        raise ConfigError(f"{path} holds scores made with other settings ({record.get('task')}, "
                          f"{ {k: record.get(k) for k in scored_with} }): move it aside to rescore")
    record.update(task=key, **scored_with)
    config = json.loads((run_dir / "config.json").read_text())["metatrain"]
    thetas = {0: theta_from_source(config["init_theta"], config.get("theta_seed", 0))}
    thetas.update({step: p for step, p in snapshots(run_dir, every).items()})
    todo = {step: t for step, t in thetas.items() if str(step) not in record["snapshots"]}
    for step, theta in sorted(todo.items()):
        theta = load_checkpoint(theta) if isinstance(theta, Path) else theta
        rows = evaluate([Candidate(f"step {step}", "celo2", lr, theta, adamw_lr_mult) for lr in celo2_lrs],
                        settings, task)
        (best,) = rows  # one label: evaluate already picked its best learning rate
        record["snapshots"][str(step)] = _summary(best)
        write_json(path, record)  # after each snapshot: an interrupted refresh keeps its work
    references = {"normalized_momentum": [Candidate("normalized_momentum", "celo2", lr,
                                                    theta_from_source("normalized_momentum"), adamw_lr_mult)
                                          for lr in celo2_lrs]}
    references.update({name: [Candidate(name, name, lr, None, 1.0) for lr in grid]
                       for name, grid in reference_grids.items()})
    for name, candidates in references.items():
        if name not in record["references"]:
            (best,) = evaluate(candidates, settings, task)
            record["references"][name] = _summary(best)
            write_json(path, record)
    return record


def _summary(row: dict) -> dict:
    return {k: row.get(k) for k in ("mean", "std", "min", "max", "lr", "grid")}


def scored_snapshots(run_dir: Path, task: TinyLM, settings: EvalSettings, celo2_lrs, adamw_lr_mult: float) -> dict:
    """Outer step -> validation row of the snapshots ``RUN/validation.json`` already scored with these
    exact settings (empty when it holds other settings), so shipping need not train them again."""
    path = run_dir / SCORES_FILE
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    same = (record.get("task") == f"{task.name}/{settings.steps}x{settings.seeds}"
            and record.get("settings", dataclasses.asdict(settings)) == dataclasses.asdict(settings)
            and record.get("celo2_lrs", list(CELO2_LRS)) == list(celo2_lrs)
            and record.get("adamw_lr_mult", 20.0) == adamw_lr_mult)
    if not same:
        return {}
    rows = {}
    for step, row in record["snapshots"].items():
        if int(step) > 0:  # step 0 is the starting theta, not a snapshot
            rows[int(step)] = {"label": f"step {step}", "outer_step": int(step), "adamw_lr_mult": adamw_lr_mult,
                               "at_edge": [], **{k: row.get(k, row["mean"]) for k in ("min", "max")},
                               **{k: v for k, v in row.items() if k not in ("min", "max")}}
    return rows


def meta_losses(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    steps, losses = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind", "train") == "train" and "meta_loss" in row:
            steps.append(row["outer_step"])
            losses.append(row["meta_loss"])
    return np.asarray(steps), np.asarray(losses)


def plot(run_dir: Path, records: list[dict], out: Path, smooth: int = 20) -> Path:
    """Meta-loss on top, then one panel per scored task (validation, held-out, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, *panels) = plt.subplots(1 + len(records), 1, figsize=(7, 3.25 * (1 + len(records))), sharex=True)
    steps, losses = meta_losses(run_dir)
    top.plot(steps, losses, color="0.75", lw=0.6, label="meta-loss (logged)")
    if len(losses) >= smooth:
        kernel = np.ones(smooth) / smooth
        top.plot(steps[smooth - 1:], np.convolve(losses, kernel, mode="valid"), color="C0",
                 label=f"mean of {smooth} logs")
    top.set_ylabel("meta-loss (loss / initial loss)")
    top.legend(loc="upper right", fontsize=8)
    for panel, record in zip(panels, records):
        _draw_scores(panel, record)
    panels[-1].set_xlabel("outer step")
    fig.suptitle(f"meta-training {run_dir.name}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _draw_scores(panel, record: dict) -> None:
    scored = sorted((int(k), v) for k, v in record["snapshots"].items())
    xs = [k for k, _ in scored]
    ys = [v["mean"] if math.isfinite(v["mean"]) else np.nan for _, v in scored]
    errs = [v["std"] if math.isfinite(v["std"]) else 0.0 for _, v in scored]
    panel.errorbar(xs, ys, yerr=errs, marker="o", color="C0", label="Celo2, snapshot theta")
    for i, (name, ref) in enumerate(sorted(record["references"].items())):
        panel.axhline(ref["mean"], color=f"C{i + 1}", ls="--", label=f"{name} (lr {ref['lr']:g}) {ref['mean']:.3f}")
    finite = [y for y in ys if np.isfinite(y)] + [r["mean"] for r in record["references"].values()]
    if finite:  # zoomed on what is close to the best; a far line (AdamW, often) keeps its value in the legend
        low = min(finite)
        near = max(y for y in finite if y <= low + ZOOM)
        margin = max(0.1 * (near - low), 0.005)
        panel.set_ylim(low - margin, near + margin)
    panel.set_ylabel(f"validation loss\n({record['task']})")
    panel.legend(fontsize=8)
