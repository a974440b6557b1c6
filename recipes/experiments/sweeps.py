"""Grids of training runs: expansion, running (resumably), and the results table.

A sweep is a base recipe, a grid of dotted keys with lists of values (its
Cartesian product gives the points) and fixed overrides. Every point is an
ordinary run directory under the sweep directory, trained by
``python train.py --config BASE --key=value ... --train.out_dir=POINT``; since
train.py resumes a run directory, rerunning a sweep continues interrupted
points, and points whose own ``summary.json`` says finished are skipped.

Every point's config is loaded as train.py loads it before any point trains: a value the
config's types refuse stops the sweep before any point starts, and values of one key that give
the same settings (1e-3 and 0.001) are trained once. The results table comes from each
point's own records: only a point whose summary.json says finished and whose metrics.jsonl
holds trained steps is finished, and only finished or diverged points have a final loss.
A rerun with a changed grid keeps the rows of earlier points outside it (``in_grid`` False),
and sweep.json keeps the earlier grids.

One sweep at a time per sweep directory (its ``.lock``, a RunDirLock); a second is refused
and changes nothing. The train.py children cannot outlive the sweep: each runs in its own
session (a terminal's Ctrl-C reaches the sweep only, which passes it on once), a SIGTERM or
SIGINT to the sweep goes on to every running child, which saves a checkpoint and exits
143/130, and on Linux each child asks the kernel for a SIGTERM when the sweep dies
(PR_SET_PDEATHSIG), so a SIGKILLed sweep leaves no orphan training on. A rerun that finds a
point's run directory still locked by a live trainer waits for it, then resumes the point.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import yaml

from recipes.config_parsing import resolve_path
from model.config_base import ConfigError
from data.files import write_json
from recipes.train.cli import EXIT_CODES, one_line
from recipes.train.metrics import read_records
from recipes.train.run_dir import RunDirLock
from recipes.train.stop import StopRequest
from recipes.experiments.sweep_tables import OPTIMIZER, in_grid, markdown

REPO = Path(__file__).resolve().parents[2]
SWEEP_DIR_NAME = REPO / "configs" / "sweeps"
POINT_FILE = "point.json"

logger = logging.getLogger(__name__)
RESULT_COLUMNS = ("point", "final_val_loss", "best_val_loss", "initial_val_loss", "tokens", "steps",
                  "wall_time_s", "target_val_loss", "target_step", "target_tokens", "target_wall_time_s", "diverged",
                  "status", "in_grid")
# A point whose summary.json says finished but whose metrics.jsonl holds no row past step 0 (its
# directory was deleted or replaced under the run): rerunning would train nothing, so it is skipped.
RECORDS_MISSING = "records missing"


class SweepError(ValueError):
    """A sweep specification that cannot be run."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    config: str
    grid: dict[str, list[str]]
    overrides: dict[str, str]
    out: Path
    workers: int = 1
    # The other grids this sweep directory was swept with (sweep.json keeps them, oldest first).
    earlier_grids: tuple[dict[str, list[str]], ...] = ()

    def points(self) -> list[dict[str, str]]:
        return _product(self.grid)

    def outside_points(self) -> list[dict[str, str]]:
        """Points of the earlier grids that are not in this one and have a run directory."""
        current = {point_name(p) for p in self.points()}
        outside = {}
        for grid in self.earlier_grids:
            for point in _product(grid):
                name = point_name(point)
                if name not in current and (self.out / name).is_dir():
                    outside.setdefault(name, point)
        return list(outside.values())


def _product(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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


def make_spec(*, config: str | None, swept: dict[str, list[str]], fixed: dict[str, str], out: str | None,
              workers: int | None, sweep_file: str | None = None) -> SweepSpec:
    """Swept keys (their values) and fixed settings over an optional sweep file, replacing its entry
    for the same key, swept or fixed; every point checked by the config's own types (check_points)."""
    base = load_sweep_yaml(sweep_file) if sweep_file else {}
    grid = {k: [_text(v) for v in (vs if isinstance(vs, list) else [vs])]
            for k, vs in (base.get("grid") or {}).items() if k not in fixed} | swept
    fixed = {k: _text(v) for k, v in (base.get("set") or {}).items() if k not in swept} | fixed
    config = config or base.get("config")
    out = out or base.get("out")
    if not config:
        raise SweepError("no base recipe: pass --config NAME.yaml or put `config:` in the sweep file")
    if not grid:
        raise SweepError("empty grid: sweep at least one key, its values separated by commas: "
                         "--optimizer.lr=1e-3,3e-3")
    if not out:
        raise SweepError("no sweep directory: pass --out DIR or put `out:` in the sweep file")
    clash = sorted(set(grid) & set(fixed))
    if clash:
        raise SweepError(f"{clash} are both swept (grid:) and fixed (set:) in {sweep_file}; keep one")
    if "train.out_dir" in grid or "train.out_dir" in fixed:
        raise SweepError("train.out_dir is set by the sweep (one run directory per point under --out)")
    workers = int(workers if workers is not None else base.get("workers", 1))
    if workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    for key, values in grid.items():
        for value in values:
            _ = point_name({key: value})  # refuse values that cannot name a directory early
    # Absolute: the train.py children run in the repository, wherever the sweep was started.
    spec = SweepSpec(config=str(config), grid=grid, overrides=fixed, out=Path(out).absolute(), workers=workers)
    return check_points(spec)


def check_points(spec: SweepSpec) -> SweepSpec:
    """``spec`` with every point's config loaded as train.py will load it (no JAX work), so a
    value the config refuses stops the sweep before anything trains; values of a key that give
    the same settings as an earlier value of it, at every point (1e-3 and 0.001), are dropped."""
    from recipes.train.config import load_config, to_dict  # imports JAX: only once a sweep is made

    resolve_path(spec.config)  # a missing recipe is the recipe's error, not a point's
    settings = {}
    for point in spec.points():
        try:
            config = load_config(spec.config, _overrides(spec, point), [])
        except ConfigError as error:
            given = ",".join(f"{k}={v}" for k, v in point.items())
            raise SweepError(f"point {given}: {one_line(error)}; fix the value "
                             "(no point was started)") from None
        settings[tuple(point.values())] = to_dict(config)
    grid = {}
    for index, (key, values) in enumerate(spec.grid.items()):
        grid[key] = []
        for value in values:
            kept = next((other for other in grid[key] if _same_settings(settings, index, value, other)), None)
            if kept is None:
                grid[key].append(value)
            else:
                logger.info(f"note: {key}: {value} " + ("is given twice" if value == kept else f"is the same "
                    f"setting as {kept}") + f"; trained once, as {point_name({key: kept})}")
    spec = dataclasses.replace(spec, grid=grid)
    names = [point_name(p) for p in spec.points()]
    clash = sorted({name for name in names if names.count(name) > 1})
    if clash:
        raise SweepError(f"different points would share the run directory {clash[0]}: their values differ only in "
                         "characters a directory name cannot hold; choose values that differ in letters or digits")
    return spec


def point_name(point: dict[str, str]) -> str:
    """A directory name that states the point: name=celo2,lr=0.003,weight_decay=0.1."""
    parts = []
    for key, value in point.items():
        safe = re.sub(r"[^A-Za-z0-9.+\-_]", "_", value)
        if not safe or safe in (".", ".."):
            raise SweepError(f"value {value!r} of {key} cannot name a run directory")
        parts.append(f"{key.split('.')[-1]}={safe}")
    return ",".join(parts)


def _same_settings(settings: dict[tuple, dict], index: int, value: str, other: str) -> bool:
    """Whether the grid's ``index``-th key at ``value`` gives the same config as at ``other``,
    whatever the other keys are."""
    return all(config == settings[(*combo[:index], other, *combo[index + 1:])]
               for combo, config in settings.items() if combo[index] == value)


def _overrides(spec: SweepSpec, point: dict[str, str]) -> list[str]:
    return [f"--{k}={v}" for k, v in {**spec.overrides, **point}.items()]


def train_argv(spec: SweepSpec, point: dict[str, str]) -> list[str]:
    """The arguments of train.py for one point (without the interpreter and script)."""
    return ["--config", spec.config, *_overrides(spec, point), f"--train.out_dir={spec.out / point_name(point)}"]


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


def slurm_array_script(spec: SweepSpec, python: str = sys.executable) -> str:
    """An sbatch job-array script: array task i runs point i's train.py command (the arguments
    --print-commands prints), so it also runs as ``SLURM_ARRAY_TASK_ID=i bash FILE``. The
    interpreter is the one that checked the points, unless PYTHON names another."""
    points = spec.points()
    last = len(points) - 1
    arms = []
    for index, point in enumerate(points):
        argv = shlex.join(["train.py", *train_argv(spec, point)])
        arms.append(f"  {index}) exec \"$PYTHON\" {argv} ;;")
    return "\n".join([
        "#!/bin/bash",
        f"# The sweep of {spec.config} into {spec.out}: one array task per point ({len(points)}).",
        "#   sbatch [--gpus=1 --time=4:00:00 ...] THIS_FILE      or, anywhere:  SLURM_ARRAY_TASK_ID=0 bash THIS_FILE",
        "# A task runs its point's train.py command (as scripts/sweep.py --print-commands prints it).",
        "# Submitting the file again resumes each unfinished point from its checkpoint; a finished",
        "# point trains nothing. Once every task has ended, scripts/sweep.py with the same flags",
        "# (without --slurm-array) finds the points finished and writes results.csv without training",
        "# them again (it would train a point that did not finish).",
        "#SBATCH --job-name=sweep",
        f"#SBATCH --array=0-{last}",
        f"#SBATCH --output={spec.out}/slurm-%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:TERM@120",
        "#SBATCH --requeue",
        "# train.py replaces this shell (exec), so the SIGTERM sent 120 s before the time limit reaches",
        "# it: it saves a checkpoint and exits 143. A preempted task is requeued and resumes.",
        "",
        f"cd {shlex.quote(str(REPO))} || exit 1",
        f"PYTHON=${{PYTHON:-{shlex.quote(python)}}}",
        'case "${SLURM_ARRAY_TASK_ID-}" in',
        *arms,
        (f'  *) echo "error: SLURM_ARRAY_TASK_ID=\'${{SLURM_ARRAY_TASK_ID-}}\' is not a point of this sweep '
         f'(0 to {last})" >&2'),
        "     exit 1 ;;",
        "esac",
        "",
    ])


def write_slurm_array(spec: SweepSpec, path: Path) -> None:
    """Writes slurm_array_script to a new file; the sweep directory is made now, since Slurm
    writes each task's output there before train.py starts."""
    if path.exists():
        raise SweepError(f"{path} exists: choose a new file for --slurm-array (nothing was written)")
    path.write_text(slurm_array_script(spec))
    spec.out.mkdir(parents=True, exist_ok=True)


def summarize(run_dir: Path, point: dict[str, str], in_grid: bool = True) -> dict:
    """One results row from a run directory's own records (metrics.jsonl, summary.json) and the
    sweep's point record. Only a run that ended (finished or diverged) has a final loss: the
    last evaluation of an interrupted or unstarted point is not a result."""
    record = _read_point(run_dir)
    metrics = read_records(run_dir)
    summary = _read_json(run_dir / "summary.json")
    status = point_status(record, summary, metrics)
    vals = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    trains = [m for m in metrics if "loss" in m]
    losses = [v for _, v in vals]
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    initial = losses[0] if losses else (trains[0]["loss"] if trains else None)
    final = losses[-1] if losses and status in ("finished", "diverged") else None
    nonfinite = any(v is None or not math.isfinite(v) for v in losses) or any(
        m["loss"] is None for m in trains) or status == "diverged"
    # The first evaluation at or below train.target_val_loss (the latest target, if it was changed).
    targets = [m for m in metrics if m.get("target_step") is not None]
    reached = next((m for m in targets if m.get("target_val_loss") == targets[-1].get("target_val_loss")), {}) \
        if targets else {}
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
        # The sweep's own clock (start-up included) where it ran the point, else the trainer's.
        "wall_time_s": round(record.get("wall_time_s", summary.get("wall_time_s") or 0.0), 2),
        "target_val_loss": summary.get("target_val_loss", reached.get("target_val_loss")),
        "target_step": reached.get("target_step"),
        "target_tokens": reached.get("target_tokens"),
        "target_wall_time_s": reached.get("target_wall_time_s"),
        "diverged": bool(nonfinite or above_start),
        "status": status,
        "in_grid": in_grid,
    }


def point_status(record: dict, summary: dict, metrics: list[dict]) -> str:
    """How a point stands. The run's own records are the truth on whether it finished: its
    summary.json says so and its metrics.jsonl holds rows past step 0 (a step's training row may
    be missing, not its evaluation's; a point.json may be stale: written by a sweep that saw only a
    refused or killed child); the sweep's record says how its last child ended otherwise."""
    trained = any(m.get("step", 0) > 0 for m in metrics)
    if summary.get("finished"):
        return "finished" if trained else RECORDS_MISSING
    if summary.get("stopped_by") == "nonfinite":
        return "diverged"
    status = record.get("status")
    if status == "finished":  # the child finished, but its summary.json is gone or was rewritten since
        return "interrupted" if summary else RECORDS_MISSING
    return status or ("interrupted" if summary else "pending")


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


class SweepStop(StopRequest):
    """SIGTERM/SIGINT to the sweep: no further point starts, and the signal goes on to every
    running train.py child, which saves a checkpoint and exits 143/130; the sweep then writes
    its results and exits as the signal would. A second signal is passed on too (a second
    Ctrl-C interrupts the children at once, as it does train.py)."""

    def __init__(self):
        super().__init__()
        self.children: set[subprocess.Popen] = set()

    def _handle(self, signum, frame):
        for child in list(self.children):  # list(set) is atomic: children come and go in other threads
            _send(child, signum)
        super()._handle(signum, frame)


def _send(child: subprocess.Popen, signum: int) -> None:
    try:
        child.send_signal(signum)
    except ProcessLookupError:
        pass


_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl():
    """libc's prctl, or None where there is none (macOS)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with_parent() -> Callable[[], None] | None:
    """For a child's preexec_fn: ask Linux for a SIGTERM when the sweep (the thread that started
    the child, which waits on it) dies, however it dies; train.py then saves and exits. prctl is
    looked up here, in the parent: the child, forked from a threaded process, only calls it (no
    import, no lock). None where there is no prctl: a rerun then waits for an orphan to end."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def subprocess_runner(python: str = sys.executable, stop: SweepStop | None = None) -> Runner:
    """Runs train.py in a child process, its output appended to the point's train.log. The child
    has its own session (a terminal's signals reach the sweep only, which passes them on once
    through ``stop``) and dies with the sweep (``_die_with_parent``)."""
    def run(argv: list[str], log_path: Path) -> int:
        with open(log_path, "a") as log:
            child = subprocess.Popen([python, str(REPO / "train.py"), *argv], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=REPO, start_new_session=True, preexec_fn=_die_with_parent())
        if stop is None:
            return child.wait()
        stop.children.add(child)
        try:
            if stop.signal_number is not None:  # the signal came while the child was starting
                _send(child, stop.signal_number)
            return child.wait()
        finally:
            stop.children.discard(child)
    return run


def _wait_for_holder(run_dir: Path, stop, poll_s: float = 1.0) -> None:
    """A run directory still locked by a live trainer (the child of a sweep that was killed, or a
    train.py started by hand) is waited for, not failed: the point is resumed when it ends."""
    holder = RunDirLock(run_dir).holder()
    if holder:
        logger.info(f"wait   {run_dir.name}: {holder} is still training it; resuming the point when it ends")
    while holder and not stop:
        time.sleep(poll_s)
        holder = RunDirLock(run_dir).holder()


def _done(run_dir: Path) -> str | None:
    status = point_status(_read_point(run_dir), _read_json(run_dir / "summary.json"), read_records(run_dir))
    return status if status in ("finished", "diverged", RECORDS_MISSING) else None


def run_point(spec: SweepSpec, point: dict[str, str], runner: Runner, stop: SweepStop | None = None) -> dict:
    run_dir = spec.out / point_name(point)
    if not stop:
        _wait_for_holder(run_dir, stop)
    done = _done(run_dir)
    if done == RECORDS_MISSING:
        logger.info(f"skip   {run_dir.name} ({done}: its summary.json says finished but its metrics.jsonl holds no "
                    f"trained step; delete {run_dir} and rerun to train it again)")
    elif done:
        logger.info(f"skip   {run_dir.name} ({done})")
    if done or stop:  # stopped before this point began: it stays as it was
        return summarize(run_dir, point)
    record = _read_point(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info(f"{'resume' if record or (run_dir / 'checkpoints').is_dir() else 'start '} {run_dir.name}")
    start = time.perf_counter()
    code = runner(train_argv(spec, point), run_dir / "train.log")
    record = {"point": point, "status": _status_of(run_dir, code, stopped=bool(stop)), "exit_code": code,
              "runs": record.get("runs", 0) + 1,
              "wall_time_s": record.get("wall_time_s", 0.0) + time.perf_counter() - start}
    _write_point(run_dir, record)
    row = summarize(run_dir, point)
    logger.info(f"{row['status']:<8} {run_dir.name} ({record['wall_time_s']:.0f} s)")
    return row


def _status_of(run_dir: Path, code: int, stopped: bool) -> str:
    """How a child that exited with ``code`` left its point, from that code and the run's
    summary.json. A signal (the child's own exit 130/143, or death by one), a clean exit short of
    the end, or any exit while the sweep was being stopped leaves it interrupted: the next sweep
    resumes it. Too many non-finite steps (exit 3) is a diverged point: recorded, never fatal to
    the sweep."""
    summary = _read_json(run_dir / "summary.json")
    if summary.get("finished", False):
        return "finished"
    if code == EXIT_CODES["nonfinite"] or summary.get("stopped_by") == "nonfinite":
        return "diverged"
    if code == 0 or code < 0 or code in (130, 143) or stopped:
        return "interrupted"
    return "failed"


def lock_sweep_dir(out: Path) -> RunDirLock:
    """One sweep at a time per sweep directory; a second is refused before it changes anything
    (the lock file of the holder is only opened, and reading it tells who holds it)."""
    lock = RunDirLock(out)
    try:
        lock.acquire()
    except RuntimeError:
        raise SweepError(f"{out} is in use by {_read_text(lock.path) or 'another process'} (another sweep, or a "
                         "trainer): nothing was changed in it; "
                         "wait for it to finish or stop it, or choose another --out") from None
    return lock


def _read_text(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def run_sweep(spec: SweepSpec, runner: Runner | None = None, stop: SweepStop | None = None) -> list[dict]:
    """Runs every point (skipping finished ones), then writes results.csv and results.json. A
    SIGTERM or SIGINT stops it (see SweepStop; ``stop`` tells the caller which came)."""
    stop = stop if stop is not None else SweepStop()
    runner = runner or subprocess_runner(stop=stop)
    lock = lock_sweep_dir(spec.out)  # creates spec.out
    try:
        saved = _read_json(spec.out / "sweep.json")
        if saved and (saved["config"], saved["set"]) != (spec.config, spec.overrides):
            raise SweepError(
                f"{spec.out} holds a sweep of {saved['config']} fixing {saved['set']}; this one is "
                f"{spec.config} fixing {spec.overrides}. Finished points would be reused with the wrong "
                "settings: choose another --out (the grid itself may change between runs)")
        spec = dataclasses.replace(spec, earlier_grids=tuple(_earlier_grids(saved, spec.grid)))
        write_json(spec.out / "sweep.json", {"config": spec.config, "grid": spec.grid, "set": spec.overrides,
                                             "earlier_grids": list(spec.earlier_grids)}, sort_keys=False)
        points = spec.points()
        axes = " x ".join(f"{key} ({len(values)})" for key, values in spec.grid.items())
        logger.info(f"sweep of {len(points)} points, {axes}, into {spec.out} ({spec.workers} at a time)")
        outside = spec.outside_points()
        if outside:
            logger.info(f"{len(outside)} earlier point(s) outside this grid keep their rows (in_grid False): "
                        + ", ".join(point_name(p) for p in outside))
        with stop:
            try:
                with ThreadPoolExecutor(max_workers=spec.workers) as pool:
                    rows = list(pool.map(lambda p: run_point(spec, p, runner, stop), points))
                rows += [summarize(spec.out / point_name(p), p, in_grid=False) for p in outside]
            except KeyboardInterrupt:  # a second Ctrl-C: the children were interrupted as well
                rows = collect(spec)
        if stop:
            logger.info(f"{stop.signal_name} received: the running points were stopped with a checkpoint; "
                        "rerun the same command to resume them")
        write_results(spec, rows)
    finally:
        lock.release()
    return rows


def _earlier_grids(saved: dict, grid: dict) -> list[dict]:
    """The grids of a saved sweep.json other than ``grid``, oldest first: a changed grid is kept."""
    earlier = [g for g in saved.get("earlier_grids", []) if g != grid]
    if saved.get("grid") and saved["grid"] != grid and saved["grid"] not in earlier:
        earlier.append(saved["grid"])
    return earlier


def collect(spec: SweepSpec) -> list[dict]:
    return [*(summarize(spec.out / point_name(p), p) for p in spec.points()),
            *(summarize(spec.out / point_name(p), p, in_grid=False) for p in spec.outside_points())]


def outcome_line(spec: SweepSpec, rows: list[dict]) -> str:
    """'OUT/results.csv: 45 points: 4 finished, 41 unfinished, 0 diverged' (a diverged point counts
    as diverged only), then the failed points and the earlier points outside the grid."""
    grid = [r for r in rows if in_grid(r)]
    diverged = sum(bool(r["diverged"]) for r in grid)
    finished = sum(r["status"] == "finished" and not r["diverged"] for r in grid)
    line = (f"{spec.out / 'results.csv'}: {_count(len(grid), 'point')}: {finished} finished, "
            f"{len(grid) - finished - diverged} unfinished, {diverged} diverged")
    for status in ("failed", RECORDS_MISSING):
        names = [r["point"] for r in grid if r["status"] == status]
        if names:
            line += f"; {status}: {', '.join(names)}"
    if len(rows) > len(grid):
        line += f"; {_count(len(rows) - len(grid), 'earlier point')} outside the grid kept (in_grid False)"
    return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def write_results(spec: SweepSpec, rows: list[dict]) -> None:
    keys = dict.fromkeys(k for grid in (spec.grid, *spec.earlier_grids) for k in grid)
    columns = ["point", *keys, *[c for c in RESULT_COLUMNS if c != "point"]]
    with open(spec.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (spec.out / "results.json").write_text(json.dumps(rows, indent=2))
    (spec.out / "results.md").write_text(markdown(rows))
