"""What a run directory holds across invocations, and who may write it.

One trainer at a time (RunDirLock); a rerun resumes only checkpoints of its own parameter and
optimizer-state layout (check_resumable); settings a rerun changed go to config_history/;
summary.json says how the run ended; metrics.jsonl tells a resumed run its wall time so far
and whether its target was already reached.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np

from model.config_base import ConfigError
from data.files import atomic_write, write_json
from recipes.optim.optimizers import build_optimizer
from recipes.train import config as config_lib
from recipes.train.metrics import json_safe
from recipes.train.build import placeholder_theta
from recipes.train.state import abstract_param_dict

logger = logging.getLogger(__name__)


class RunDirLock:
    """An exclusive lock on a run directory for as long as a process trains into it.

    Two trainers writing one directory would double every metrics row and race their
    checkpoints; the second is refused. The lock is an OS file lock, released when the
    process ends however it ends, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path, setting: str = "train.out_dir"):
        self.path = Path(run_dir) / ".lock"
        self.setting = setting  # the setting that names the directory, for the refusal
        self._file = None

    def _open_locked(self):
        """(the lock file, open and locked) or (None, the live holder: "pid N")."""
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            return None, holder
        return handle, None

    def holder(self) -> str | None:
        """Who trains in the directory now ("pid N"), or None. Probed quietly: a lock file left by a
        process that died is taken and released, leaving no holder named."""
        if not self.path.is_file():
            return None
        handle, holder = self._open_locked()
        if handle is not None:
            handle.truncate(0)
            handle.close()
        return holder

    def acquire(self) -> None:
        """Takes the lock, or raises RuntimeError naming the live process that holds it. A lock
        file left by a process that died is taken over with a note (to this module's logger)."""
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, holder = self._open_locked()
        if handle is None:
            raise RuntimeError(f"{self.path.parent} is in use by {holder}: wait for it to finish or stop it, "
                               f"or train into another {self.setting}")
        handle.seek(0)
        left = handle.read().strip()
        if left and left != f"pid {os.getpid()}":
            logger.info(f"note: {self.path} was left by {left}, which ended without releasing it; "
                        "taking it over")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.truncate(0)  # a clean end leaves no holder named
            self._file.close()  # closing releases the lock
            self._file = None


def resume_records(records: list[dict], target: float | None) -> tuple[float, dict | None]:
    """From the metrics rows kept for a resume (MetricsLog.records): the training wall time so
    far, and where this target (the same value) was reached, if it was. Read on process 0 and
    shared with the others, so every process takes the same decisions."""
    before, reached = 0.0, None
    if jax.process_index() == 0:
        before = max((r.get("wall_time_s") or 0.0 for r in records), default=0.0)
        hits = [r for r in records if r.get("target_step") is not None and r.get("target_val_loss") == target]
        if hits:
            reached = {k: hits[0][k] for k in ("target_step", "target_tokens", "target_wall_time_s")}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        values = np.asarray([before, -1.0 if reached is None else reached["target_step"],
                             -1.0 if reached is None else reached["target_tokens"],
                             -1.0 if reached is None else reached["target_wall_time_s"]], np.float64)
        values = np.asarray(multihost_utils.broadcast_one_to_all(values))
        before = float(values[0])
        reached = None if values[1] < 0 else {"target_step": int(values[1]), "target_tokens": int(values[2]),
                                              "target_wall_time_s": float(values[3])}
    return before, reached


def _flat_keys(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Everything a trainer (or a sweep, for its points) writes into a run directory; temporaries of
# atomic writes start with a dot and are ignored.
RUN_DIR_ENTRIES = {"config.yaml", "config_history", "routing.json", "routing.txt", "metrics.jsonl",
                   "metrics.set_aside.jsonl", "summary.json", "checkpoints", "checkpoints.damaged", "wandb",
                   "wandb_id.txt", "train.log", "point.json"}
RUN_DIR_MARKS = ("config.yaml", "checkpoints", "routing.json")  # any of them: a trainer wrote here
SWEEP_ENTRIES = {"train.log", "point.json"}  # written by a sweep before its trainer starts


def check_run_dir(run_dir: Path) -> None:
    """Refuses a train.out_dir that is a file, lies inside another run's directory, holds a symbolic
    link (a run writes regular files inside its directory only), or holds files no trainer wrote (a
    run would append to, rewrite or set aside the user's files)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.out_dir {run_dir} is a file, not a directory: pick another train.out_dir")
    for parent in run_dir.parents:
        if (parent / "config.yaml").is_file() and (parent / "checkpoints").is_dir():
            raise ConfigError(f"train.out_dir {run_dir} lies inside the run directory {parent}, whose next resume "
                              "would move it aside: pick a train.out_dir outside it")
    if not run_dir.is_dir():
        return
    for folder, dirs, files in os.walk(run_dir):  # os.walk does not follow links into other folders
        links = [name for name in dirs + files if (Path(folder) / name).is_symlink()]
        if links:
            link = Path(folder) / links[0]
            raise ConfigError(f"train.out_dir {run_dir} holds a symbolic link, {link} -> {os.readlink(link)}; "
                              "a run writes only regular files inside its directory, so nothing was changed. "
                              "Replace the link with a copy of what it points to, or pick another train.out_dir")
    entries = sorted(e.name for e in run_dir.iterdir() if not e.name.startswith("."))
    foreign = [e for e in entries if e not in RUN_DIR_ENTRIES]
    # A sweep opens its point's train.log (and point.json) before the trainer starts: those alone are ours.
    if set(entries) - SWEEP_ENTRIES and not foreign and not any((run_dir / m).exists() for m in RUN_DIR_MARKS):
        foreign = entries  # metrics.jsonl and the like, but no trace of a trainer: not ours either
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"train.out_dir {run_dir} holds files a trainer did not write ({shown}); nothing was "
                          "changed in it. Pick an empty or new train.out_dir, or the directory of an earlier run")


def saved_settings(run_dir: Path):
    """The settings the run directory's checkpoints were trained with: the newest checkpoint's own
    record, else config.yaml (checkpoints written before records carried it). None for a new run."""
    # The records are read as files, not through orbax: its manager synchronizes processes, and
    # processes may reach this before or after process 0 created the checkpoints folder.
    folder = run_dir / "checkpoints"
    steps = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit()), reverse=True) \
        if folder.is_dir() else []
    for step in steps:
        try:
            settings = json.loads((folder / str(step) / "meta" / "metadata").read_text()).get("config")
            if settings:
                return config_lib.Config.from_dict(settings)
        except (OSError, ValueError, ConfigError):  # damaged, or written under older names: look further
            continue
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            return config_lib.load_config(saved)
        except Exception as error:  # random bytes fail in YAML's reader or in decoding
            if steps:
                raise ConfigError(f"{saved} is not readable ({error}) and no checkpoint records its "
                                  "settings; restore the file or pick a new train.out_dir") from None
            logger.info(f"note: {saved} is not readable; no checkpoint depends on it, so it goes to config_history/")
    return None


# Model settings that change how the parameters are computed with, not what they mean; every other
# model setting (a head count, a width, the vocabulary) gives the same arrays another function.
HOW_COMPUTED = ("model.compute_dtype", "model.remat", "model.residual_dtype", "model.unroll_layers",
                "model.attention_impl", "model.loss_chunk_tokens", "model.init_std")
# Optimizer settings that decide what each slot of the optimizer state holds.
STATE_MEANING = ("optimizer.name", "optimizer.routing.")
# Settings that may add or drop optimizer-state slots without changing what the others mean.
LAYOUT_TOO = ("optimizer.grad_clip_norm", "optimizer.decay_rank1", "data.micro_batch")


def changes_meaning(key: str) -> bool:
    """Whether changing ``key`` on resume gives the checkpoint's parameters or optimizer state another
    meaning (refused), rather than another way to go on training them (allowed, with a note)."""
    if key.startswith("model."):
        return key not in HOW_COMPUTED
    return key.startswith(STATE_MEANING)


def check_resumable(run_dir: Path, config, state_abstract) -> None:
    """Refuses to rerun into a run directory whose checkpoints were trained with settings that give
    its parameters or optimizer state another meaning or layout (read from the checkpoints
    themselves, so a lost config.yaml changes nothing); other changes (learning rate, steps, data,
    evaluation, logging) are allowed, with a note."""
    check_run_dir(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        return
    old = saved_settings(run_dir)
    if old is None:
        return
    old_values, new_values = _flat_keys(config_lib.to_dict(old)), _flat_keys(config_lib.to_dict(config))
    changed = sorted(k for k in set(old_values) | set(new_values)
                     if old_values.get(k) != new_values.get(k) and not k.startswith("train.out_dir"))

    def listed(keys):
        return ", ".join(f"{k} {old_values.get(k)!r} -> {new_values.get(k)!r}" for k in keys[:6])

    meaning = [k for k in changed if changes_meaning(k)]
    graphdef, params_abstract = abstract_param_dict(old.model)
    old_tx, _ = build_optimizer(old.optimizer, params_abstract, theta=placeholder_theta(old), total_steps=old.train.steps)
    old_state = jax.eval_shape(lambda: {"params": params_abstract, "opt_state": old_tx.init(params_abstract)})
    new_state = {"params": state_abstract["params"], "opt_state": state_abstract["opt_state"]}

    def layout(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, [(tuple(x.shape), str(x.dtype)) for x in leaves]

    if layout(old_state) != layout(new_state):
        shaping = [k for k in changed if changes_meaning(k) or k.startswith(LAYOUT_TOO)] or changed
        raise ConfigError(
            f"{run_dir} holds checkpoints of another model or optimizer layout ({listed(shaping)}); "
            "nothing was changed in it. Rerun with its settings to resume, or pick a new train.out_dir")
    if meaning:
        raise ConfigError(
            f"{run_dir} holds checkpoints trained with other settings that change what the parameters or the "
            f"optimizer state mean ({listed(meaning)}); nothing was changed in it. Rerun with its settings to "
            "resume, or pick a new train.out_dir")
    if changed:
        logger.info(f"note: resuming {run_dir} with changed settings: "
                    + ", ".join(f"{k} {old_values.get(k)!r} -> {new_values.get(k)!r}" for k in changed[:8]))


def keep_config_history(run_dir: Path, new_yaml: str) -> None:
    """config.yaml is the settings now; settings a rerun changed go to config_history/, never lost."""
    current = run_dir / "config.yaml"
    if current.is_file() and current.read_bytes() != new_yaml.encode():  # bytes: the old file may not be text
        history = run_dir / "config_history"
        history.mkdir(exist_ok=True)
        current.rename(history / f"config.{len(list(history.glob('config.*.yaml'))) + 1}.yaml")
    atomic_write(current, new_yaml)


def write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json: what sweeps and schedulers read to tell a finished run from a stopped one."""
    if jax.process_index() == 0:
        write_json(run_dir / "summary.json", json_safe(summary), allow_nan=False, sort_keys=False)


def record_settings(run_dir: Path, program) -> None:
    """Writes the settings the run trains with (config.yaml, the routing table), once it is sure to
    train: a rerun that trains nothing leaves the record of how the checkpoints were trained as it was."""
    if jax.process_index() == 0:
        keep_config_history(run_dir, config_lib.to_yaml(program.config))
        program.routing.save(run_dir / "routing.json")
        atomic_write(run_dir / "routing.txt", program.routing.format() + "\n")


@contextlib.contextmanager
def locked(run_dir: Path, setting: str = "train.out_dir"):
    """One trainer per directory: ``run_dir`` locked (RunDirLock) for the block, on process 0 (the
    one that writes it); a directory another live process holds is refused (ConfigError)."""
    lock = RunDirLock(run_dir, setting) if jax.process_index() == 0 else None
    if lock is not None:
        try:
            lock.acquire()
        except RuntimeError as error:
            raise ConfigError(str(error)) from None
    try:
        yield run_dir
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def open_run_dir(program):
    """The run directory of ``program``'s config, checked (check_resumable) before anything in it
    is written, and locked for this process. Yields its absolute path; the lock is released however
    the block ends. The trainer records the settings (record_settings) once it knows it will train."""
    config = program.config
    run_dir = Path(config.train.out_dir).absolute()
    check_resumable(run_dir, config, program.state_abstract)
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir):
        yield run_dir
