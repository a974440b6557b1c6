"""Pick a meta-training snapshot by validation and ship it under recipes/optim/weights/NAME/.

The paper's authors chose their released checkpoint by validation on a small
language-modeling task, not by meta-loss; this does the same on the
``validation`` evaluation task, which shares no shape with the held-out task
the docs report on. A shipped theta is three files: ``theta.state`` (official
format), ``config.json`` (the run's meta-training settings) and
``provenance.json`` (which snapshot, how it was chosen, every score).
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

from recipes.optim.theta import WEIGHTS_DIR, load_checkpoint
from model.config_base import ConfigError
from data.files import atomic_path, write_json
from recipes.metatrain.checkpoint import SNAPSHOT_NAME, SNAPSHOTS_DIR
from recipes.metatrain.evaluate import Candidate, EvalSettings, evaluate
from recipes.metatrain.tasks.lm import TinyLM

_NAME = re.compile(r"[A-Za-z0-9_-]+")


def snapshots(run_dir: Path, every: int = 1) -> dict[int, Path]:
    """Outer step -> theta.state of a run's snapshots, keeping steps divisible by ``every``."""
    found = {int(m.group(1)): p for p in sorted((run_dir / SNAPSHOTS_DIR).glob("theta_*.state"))
             if (m := SNAPSHOT_NAME.fullmatch(p.name))}
    if not found:
        raise FileNotFoundError(f"{run_dir / SNAPSHOTS_DIR} holds no theta_NNNNNNN.state snapshots: "
                                "meta-train first (scripts/metatrain.py) with metatrain.snapshot_every > 0")
    return {step: path for step, path in found.items() if step % every == 0 or step == max(found)}


def score_snapshots(paths: dict[int, Path], task: TinyLM, settings: EvalSettings, lrs: list[float],
                    adamw_lr_mult: float) -> list[dict]:
    """One row per snapshot: its best learning rate's validation statistics."""
    candidates = [Candidate(f"step {step}", "celo2", lr, load_checkpoint(path), adamw_lr_mult)
                  for step, path in sorted(paths.items()) for lr in lrs]
    rows = evaluate(candidates, settings, task)
    for row in rows:
        row["outer_step"] = int(row["label"].split()[1])
    return rows


def ship_target(name: str, weights_dir: Path = WEIGHTS_DIR, overwrite: bool = False) -> Path:
    """weights_dir/name, once ``name`` is a plain name (letters, digits, _ and -: nothing outside
    weights_dir) and nothing is shipped under it yet, unless ``overwrite``; else ConfigError."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--name must be a plain name of letters, digits, '_' and '-' (it names a folder "
                          f"of {weights_dir}), got {name!r}")
    out = weights_dir / name
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a shipped theta's folder: move it, or pick another --name")
    if out.exists() and not overwrite:
        raise ConfigError(f"a theta is already shipped as {name!r} ({out}); nothing was changed. Pick another "
                          "--name, or pass --overwrite to replace it")
    return out


def ship(run_dir: Path, name: str, rows: list[dict], paths: dict[int, Path], selected_by: str,
         weights_dir: Path = WEIGHTS_DIR, overwrite: bool = False) -> Path:
    """Copies the best-scoring snapshot and the run's config to weights_dir/name (refused by
    ship_target); returns the theta path."""
    out = ship_target(name, weights_dir, overwrite)
    finite = [r for r in rows if math.isfinite(r["mean"])]
    if not finite:
        raise ValueError(f"every snapshot of {run_dir} diverged on the validation task; nothing to ship")
    best = min(finite, key=lambda r: r["mean"])
    load_checkpoint(paths[best["outer_step"]])  # refuse to ship a file the loader would reject
    out.mkdir(parents=True, exist_ok=True)
    for source, target in ((paths[best["outer_step"]], out / "theta.state"),
                           (run_dir / "config.json", out / "config.json")):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    write_json(out / "provenance.json", {
        "outer_step": best["outer_step"], "lr": best["lr"], "validation_loss": best["mean"],
        "selected_by": selected_by,
        "scores": [{k: r[k] for k in ("outer_step", "lr", "mean", "std")} for r in sorted(rows, key=lambda r: r["outer_step"])],
    })
    return out / "theta.state"


def describe(settings: EvalSettings, task: TinyLM, lrs: list[float]) -> str:
    return (f"lowest mean final validation loss on the {task.name} task ({settings.steps} steps, "
            f"{settings.seeds} seeds, best of Celo2 lr {', '.join(f'{lr:g}' for lr in lrs)})")

