"""Grids of training runs: expansion, running (resumably), and the results table.

A sweep is a base recipe, a grid of dotted keys with lists of values (its
Cartesian product gives the points) and fixed overrides. Every point is an
ordinary run directory under the sweep directory, trained by
``python train.py --config BASE --key=value ... --train.out_dir=POINT``; since
train.py resumes a run directory, rerunning a sweep continues interrupted
points, and points with a ``point.json`` marked finished are skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import yaml

from recipes.files import write_json
from recipes.train.metrics import read_records
from recipes.experiments.sweep_tables import OPTIMIZER, markdown

REPO = Path(__file__).resolve().parents[2]
SWEEP_DIR_NAME = REPO / "configs" / "sweeps"
POINT_FILE = "point.json"
RESULT_COLUMNS = ("point", "final_val_loss", "best_val_loss", "initial_val_loss", "tokens", "steps",
                  "wall_time_s", "target_val_loss", "target_step", "target_tokens", "target_wall_time_s", "diverged",
                  "status")


class SweepError(ValueError):
    """A sweep specification that cannot be run."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    config: str
    grid: dict[str, list[str]]
    overrides: dict[str, str]
    out: Path
    workers: int = 1

    def points(self) -> list[dict[str, str]]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_assignment(text: str, what: str) -> tuple[str, str]:
    """'section.key=value' -> (key, value), refusing anything else."""
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key):
        raise SweepError(f"{what} {text!r} should look like section.key=value (for example optimizer.lr=3e-3)")
    return key, value.strip()


def parse_grid(text: str) -> tuple[str, list[str]]:
    """'optimizer.lr=1e-3,3e-3' -> ('optimizer.lr', ['1e-3', '3e-3'])."""
    key, values = parse_assignment(text, "--grid")
    items = [v.strip() for v in values.split(",")]
    if not all(items):
        raise SweepError(f"--grid {text!r} has an empty value; separate values with commas: {key}=a,b,c")
    if len(set(items)) != len(items):
        raise SweepError(f"--grid {text!r} repeats a value")
    return key, items


def load_sweep_yaml(path: str | Path) -> dict:
    """A sweep file: a path, or a bare name in configs/sweeps/."""
    path = Path(path)
    if not path.is_file() and (SWEEP_DIR_NAME / path).is_file():
        path = SWEEP_DIR_NAME / path
    if not path.is_file():
        raise SweepError(f"no sweep file {path}; give a path or a name in {SWEEP_DIR_NAME}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"config", "grid", "set", "out", "workers"}
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}; valid keys: config, grid, set, out, workers")
    return data


def make_spec(*, config: str | None, grids: list[str], sets: list[str], out: str | None,
              workers: int | None, sweep_file: str | None = None) -> SweepSpec:
    """Command-line flags over an optional sweep file (flags win)."""
    base = load_sweep_yaml(sweep_file) if sweep_file else {}
    grid = {k: [_text(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in (base.get("grid") or {}).items()}
    for text in grids:
        key, values = parse_grid(text)
        grid[key] = values
    overrides = {k: _text(v) for k, v in (base.get("set") or {}).items()}
    for text in sets:
        key, value = parse_assignment(text, "--set")
        overrides[key] = value
    config = config or base.get("config")
    out = out or base.get("out")
    if not config:
        raise SweepError("no base recipe: pass --config NAME.yaml or put `config:` in the sweep file")
    if not grid:
        raise SweepError("empty grid: pass at least one --grid section.key=v1,v2")
    if not out:
        raise SweepError("no sweep directory: pass --out DIR or put `out:` in the sweep file")
    clash = sorted(set(grid) & set(overrides))
    if clash:
        raise SweepError(f"{clash} are both swept (--grid) and fixed (--set); keep one")
    if "train.out_dir" in grid or "train.out_dir" in overrides:
        raise SweepError("train.out_dir is set by the sweep (one run directory per point under --out)")
    workers = int(workers if workers is not None else base.get("workers", 1))
    if workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    for key, values in grid.items():
        for value in values:
            _ = point_name({key: value})  # refuse values that cannot name a directory early
    return SweepSpec(config=str(config), grid=grid, overrides=overrides, out=Path(out), workers=workers)


def point_name(point: dict[str, str]) -> str:
    """A directory name that states the point: name=celo2,lr=0.003,weight_decay=0.1."""
    parts = []
    for key, value in point.items():
        safe = re.sub(r"[^A-Za-z0-9.+\-_]", "_", value)
        if not safe or safe in (".", ".."):
            raise SweepError(f"value {value!r} of {key} cannot name a run directory")
        parts.append(f"{key.split('.')[-1]}={safe}")
    return ",".join(parts)


def train_argv(spec: SweepSpec, point: dict[str, str]) -> list[str]:
    """The arguments of train.py for one point (without the interpreter and script)."""
    argv = ["--config", spec.config]
    argv += [f"--{k}={v}" for k, v in {**spec.overrides, **point}.items()]
    argv.append(f"--train.out_dir={spec.out / point_name(point)}")
    return argv


def commands(spec: SweepSpec, python: str = "python") -> list[str]:
    return [shlex.join([python, "train.py", *train_argv(spec, p)]) for p in spec.points()]


def wandb_sweep_yaml(spec: SweepSpec) -> str:
    """The equivalent W&B grid sweep: its agent passes each point as --key=value, like train.py takes."""
    def typed(value: str):
        loaded = yaml.safe_load(value)
        return loaded if isinstance(loaded, (int, float, bool, str)) else value

    parameters = {k: {"values": [typed(v) for v in vs]} for k, vs in spec.grid.items()}
    parameters.update({k: {"value": typed(v)} for k, v in spec.overrides.items()})
    document = {
        "program": "train.py",
        "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "${program}", "--config", spec.config, "${args}"],
    }
    return yaml.safe_dump(document, sort_keys=False)


def summarize(run_dir: Path, point: dict[str, str]) -> dict:
    """One results row from a run directory's metrics and the sweep's point record."""
    record = _read_point(run_dir)
    metrics = read_records(run_dir)
    vals = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    trains = [m for m in metrics if "loss" in m]
    losses = [v for _, v in vals]
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    initial = losses[0] if losses else (trains[0]["loss"] if trains else None)
    final = losses[-1] if losses else None
    nonfinite = any(v is None or not math.isfinite(v) for v in losses) or any(
        m["loss"] is None for m in trains) or record.get("status") == "diverged"
    # The first evaluation at or below train.target_val_loss (the latest target, if it was changed).
    targets = [m for m in metrics if m.get("target_step") is not None]
    reached = next((m for m in targets if m.get("target_val_loss") == targets[-1].get("target_val_loss")), {}) \
        if targets else {}
    summary = _read_json(run_dir / "summary.json")
    above_start = final is not None and initial is not None and math.isfinite(final) and final > initial
    return {
        "point": point_name(point),
        **_optimizer_of(run_dir, point),
        **point,
        "final_val_loss": final,
        "best_val_loss": min(finite) if finite else None,
        "initial_val_loss": initial,
        "tokens": max((m.get("tokens") or 0 for m in trains), default=0),
        "steps": max((m["step"] for m in metrics), default=0),
        "wall_time_s": round(record.get("wall_time_s", 0.0), 2),
        "target_val_loss": summary.get("target_val_loss", reached.get("target_val_loss")),
        "target_step": reached.get("target_step"),
        "target_tokens": reached.get("target_tokens"),
        "target_wall_time_s": reached.get("target_wall_time_s"),
        "diverged": bool(nonfinite or above_start),
        "status": record.get("status", "pending"),
    }


def _optimizer_of(run_dir: Path, point: dict[str, str]) -> dict:
    """{optimizer.name: ...} from the settings the run saved, when the grid does not set it."""
    saved = run_dir / "config.yaml"
    if OPTIMIZER in point or not saved.is_file():
        return {}
    name = ((yaml.safe_load(saved.read_text()) or {}).get("optimizer") or {}).get("name")
    return {OPTIMIZER: name} if name else {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_point(run_dir: Path) -> dict:
    return _read_json(run_dir / POINT_FILE)


def _write_point(run_dir: Path, record: dict) -> None:
    write_json(run_dir / POINT_FILE, record)


Runner = Callable[[list[str], Path], int]


def subprocess_runner(python: str = sys.executable) -> Runner:
    """Runs train.py in a child process, its output appended to the point's train.log."""
    def run(argv: list[str], log_path: Path) -> int:
        with open(log_path, "a") as log:
            return subprocess.run([python, str(REPO / "train.py"), *argv], stdout=log, stderr=subprocess.STDOUT,
                                  cwd=REPO, check=False).returncode
    return run


def run_point(spec: SweepSpec, point: dict[str, str], runner: Runner, log: Callable[[str], None] = print) -> dict:
    run_dir = spec.out / point_name(point)
    record = _read_point(run_dir)
    if record.get("status") in ("finished", "diverged"):
        log(f"skip   {run_dir.name} ({record['status']})")
        return summarize(run_dir, point)
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"{'resume' if record else 'start '} {run_dir.name}")
    start = time.perf_counter()
    code = runner(train_argv(spec, point), run_dir / "train.log")
    # Exit code 1 with a non-finite loss is a diverged point: recorded, never fatal to the sweep.
    status = "finished" if code == 0 else ("interrupted" if code < 0 or code in (130, 143) else "failed")
    if code == 0 and not _read_json(run_dir / "summary.json").get("finished", False):
        status = "interrupted"  # stopped by a signal with a checkpoint: the next sweep resumes it
    metrics_nonfinite = any(m.get("val_loss", 0.0) is None or m.get("loss", 0.0) is None for m in read_records(run_dir))
    if code != 0 and (metrics_nonfinite or "non-finite" in _tail(run_dir / "train.log")):
        status = "diverged"
    record = {"point": point, "status": status, "exit_code": code, "runs": record.get("runs", 0) + 1,
              "wall_time_s": record.get("wall_time_s", 0.0) + time.perf_counter() - start}
    _write_point(run_dir, record)
    log(f"{status:<8} {run_dir.name} ({record['wall_time_s']:.0f} s)")
    return summarize(run_dir, point)


def _tail(path: Path, size: int = 4000) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def run_sweep(spec: SweepSpec, runner: Runner | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Runs every point (skipping finished ones), then writes results.csv and results.json."""
    runner = runner or subprocess_runner()
    spec.out.mkdir(parents=True, exist_ok=True)
    saved = _read_json(spec.out / "sweep.json")
    if saved and (saved["config"], saved["set"]) != (spec.config, spec.overrides):
        raise SweepError(
            f"{spec.out} holds a sweep of {saved['config']} with --set {saved['set']}; this one is "
            f"{spec.config} with --set {spec.overrides}. Finished points would be reused with the wrong "
            "settings: choose another --out (the grid itself may grow between runs)")
    (spec.out / "sweep.json").write_text(json.dumps(
        {"config": spec.config, "grid": spec.grid, "set": spec.overrides}, indent=2))
    points = spec.points()
    log(f"sweep of {len(points)} points into {spec.out} ({spec.workers} at a time)")
    with ThreadPoolExecutor(max_workers=spec.workers) as pool:
        rows = list(pool.map(lambda p: run_point(spec, p, runner, log), points))
    write_results(spec, rows)
    return rows


def collect(spec: SweepSpec) -> list[dict]:
    return [summarize(spec.out / point_name(p), p) for p in spec.points()]


def write_results(spec: SweepSpec, rows: list[dict]) -> None:
    columns = ["point", *spec.grid, *[c for c in RESULT_COLUMNS if c != "point"]]
    with open(spec.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (spec.out / "results.json").write_text(json.dumps(rows, indent=2))
    (spec.out / "results.md").write_text(markdown(rows))
