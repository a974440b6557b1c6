"""Saving and resuming meta-training, on the trainer's orbax Checkpointer.

An output directory holds:
  config.json             the meta-training settings
  theta.state             the latest theta in the official Celo2 format
  thetas/theta_NNNNNNN.state  snapshots for picking a checkpoint by validation
  thetas.set_aside/       snapshots a resumed run abandoned (written after the checkpoint it resumed from)
  checkpoints/<step>/     orbax checkpoints of everything needed to resume (theta, outer
                          optimizer state, step, PES populations, RNG) and, beside them, the
                          settings they were written under; the last three are kept
  metrics.jsonl           one JSON record per logged outer step

Saves are asynchronous and atomic (recipes.train.checkpoint). Resume takes the newest
checkpoint that restores; a damaged one is moved to checkpoints.damaged/, never deleted.
Directories written before the move to orbax hold checkpoint/state.npz (and
checkpoint.previous/): they are read when there is no orbax checkpoint, and the run then
goes on in checkpoints/.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from model.config_base import ConfigError
from data.files import move_aside, write_json
from recipes.metatrain.config import FamilyConfig, MetaTrainConfig
from recipes.optim.theta import save_checkpoint
from recipes.train.checkpoint import Checkpointer

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
SNAPSHOTS_DIR = "thetas"
SNAPSHOTS_ASIDE_DIR = "thetas.set_aside"
SNAPSHOT_NAME = re.compile(r"theta_(\d+)\.state$")
# The npz layout written before orbax: read only.
LEGACY_DIRS = ("checkpoint", "checkpoint.new", "checkpoint.previous")
LEGACY_DAMAGED_DIR = "checkpoint.damaged"
LEGACY_STATE_FILE, LEGACY_META_FILE = "state.npz", "meta.json"
# Changing these changes the state's structure or the problem being optimized.
_MUST_MATCH = ("pes", "inner", "families", "lm_sampler")


class MetaState(NamedTuple):
    theta: Any
    opt_state: Any
    step: Any  # int32 scalar: outer steps done
    populations: dict  # family name -> PESState
    rng: Any  # uint32 key data


def _check_settings(meta: dict, config: MetaTrainConfig, where: Path) -> None:
    """Refuses a checkpoint written under other problem settings (ConfigError)."""
    record = config_record(config)
    changed = [k for k in _MUST_MATCH if _with_new_defaults(k, meta.get(k)) != record[k]]
    if changed:
        raise ConfigError(
            f"{where} was written with different {changed} settings than this config; these fix the "
            "problem and the state's layout, so resume with the original settings or pick a new metatrain.out_dir")


def _on_one_device(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


class MetaCheckpointer:
    """Checkpoints of one meta-training directory (see the module docstring)."""

    def __init__(self, out_dir: str | Path, config: MetaTrainConfig, *, keep: int = 3):
        self.out_dir, self.config = Path(out_dir), config
        self._checkpointer = Checkpointer(self.out_dir / CHECKPOINTS_DIR, keep=keep)

    def exists(self) -> bool:
        return self._checkpointer.latest_step() is not None or bool(_legacy_candidates(self.out_dir))

    def save(self, state: MetaState) -> None:
        """Starts an asynchronous save of the resumable state; writes theta.state now."""
        record = config_record(self.config)
        meta = {"step": int(state.step), **{k: record[k] for k in _MUST_MATCH},
                "resolved_families": record["resolved_families"]}
        # The trainer's Checkpointer stores "opt_state" as its flat list of leaves: the whole
        # meta-state goes there, so any PES or optax state round-trips.
        self._checkpointer.save(int(state.step), {"step": state.step, "opt_state": state}, meta)
        save_checkpoint(jax.device_get(state.theta), self.out_dir / "theta.state")

    def restore_newest(self, target: MetaState) -> MetaState | None:
        """The newest checkpoint that restores completely (``target``: the state's shapes), or None.

        A damaged one is moved aside with a note and the next older one is tried; one written
        under other settings is refused (ConfigError), since resuming it would change the problem.
        """
        abstract = _on_one_device({"step": target.step, "opt_state": target})
        where = self.out_dir / CHECKPOINTS_DIR
        _, state = self._checkpointer.restore_newest(
            abstract, check_meta=lambda meta: _check_settings(meta, self.config, where))
        if state is not None:  # through the host, so no array stays committed to one device
            return jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x)), state["opt_state"])
        return _newest_legacy_state(self.out_dir, target, self.config)

    def wait(self) -> None:
        """Returns once the saves started are on disk."""
        self._checkpointer.wait()

    def close(self) -> None:
        """Waits for the last save to finish."""
        self._checkpointer.close()


def config_record(config: MetaTrainConfig) -> dict:
    record = config.to_dict()
    record["resolved_families"] = [dataclasses.asdict(f) for f in config.all_families()]
    return json.loads(json.dumps(record, default=list))


def _with_new_defaults(section: str, saved):
    """A saved setting as this version records it: settings added since it was written take their
    defaults, which are what the run used then."""
    defaults = config_record(MetaTrainConfig(families=(FamilyConfig(),)))
    if section == "families":
        family = defaults["families"][0]
        return [{**family, **f} for f in saved or []]
    if isinstance(saved, dict):
        return {**defaults[section], **saved}
    return saved


# --- the npz layout written before orbax (read only) --------------------------------------


def _legacy_candidates(out_dir: Path) -> list[Path]:
    """npz checkpoint directories that hold a meta.json (a save cut short may leave any of them)."""
    return [out_dir / name for name in LEGACY_DIRS if (out_dir / name / LEGACY_META_FILE).is_file()]


def _newest_legacy_state(out: Path, target: MetaState, config: MetaTrainConfig) -> MetaState | None:
    def step_of(path: Path) -> int:
        try:
            return int(json.loads((path / LEGACY_META_FILE).read_text())["step"])
        except (ValueError, KeyError, TypeError, OSError):
            return -1  # unreadable: tried last, and found damaged

    for path in sorted(_legacy_candidates(out), key=step_of, reverse=True):
        try:
            return _restore_legacy(path, target, config)
        except ConfigError:  # readable, but another problem or layout: not damage
            raise
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
            # what numpy, zipfile and json raise for a truncated, missing or garbled file
            aside = move_aside(path, out / LEGACY_DAMAGED_DIR, f"{path.name}.{step_of(path)}")
            logger.info(f"checkpoint {path.name} does not restore ({type(error).__name__}: "
                        f"{' '.join(str(error).split())[:200]}); moved it to {aside}")
    return None


def _restore_legacy(ckpt: Path, target: MetaState, config: MetaTrainConfig) -> MetaState:
    """The state saved in the npz checkpoint directory ``ckpt``, checked leaf by leaf against ``target``."""
    _check_settings(json.loads((ckpt / LEGACY_META_FILE).read_text()), config, ckpt)
    target_leaves, treedef = jax.tree.flatten(target)
    with np.load(ckpt / LEGACY_STATE_FILE) as data:
        saved = [data[f"arr_{i}"] for i in range(len(data.files))]
    if len(saved) != len(target_leaves):
        raise ConfigError(f"{ckpt}: {len(saved)} saved arrays, but this config's state has {len(target_leaves)}")
    for i, (a, t) in enumerate(zip(saved, target_leaves)):
        if tuple(a.shape) != tuple(t.shape) or np.dtype(a.dtype) != np.dtype(t.dtype):
            raise ConfigError(f"{ckpt}: array {i} is {a.dtype}{list(a.shape)}, expected "
                              f"{np.dtype(t.dtype)}{list(t.shape)}")
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in saved])


def snapshot_theta(out_dir: str | Path, theta, step: int) -> Path:
    path = Path(out_dir) / SNAPSHOTS_DIR / f"theta_{step:07d}.state"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(jax.device_get(theta), path)


def set_aside_after(out_dir: str | Path, step: int) -> None:
    """Moves what a killed run wrote past outer step ``step`` (the step it now resumes from, 0 for a
    fresh start) out of the way of the timeline that goes on: theta snapshots to thetas.set_aside/,
    and their validation scores (RUN/TASK.json, written by scripts/plot_metatrain.py) to
    RUN/TASK.set_aside.jsonl. The new snapshots of those steps hold other thetas, and shipping reads
    thetas/ and the scores by step. Nothing is deleted."""
    out = Path(out_dir)
    folder = out / SNAPSHOTS_DIR
    later = sorted(p for p in folder.glob("theta_*.state")
                   if (m := SNAPSHOT_NAME.fullmatch(p.name)) and int(m.group(1)) > step) if folder.is_dir() else []
    for path in later:
        move_aside(path, out / SNAPSHOTS_ASIDE_DIR, path.name)
    if later:
        logger.info(f"moved {len(later)} theta snapshot(s) written after outer step {step} to {out / SNAPSHOTS_ASIDE_DIR}")
    for path in sorted(out.glob("*.json")):
        _set_aside_scores(path, step)


def _set_aside_scores(path: Path, step: int) -> None:
    """The scores in ``path`` of snapshots past ``step``, moved to PATH_STEM.set_aside.jsonl."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # not a scores file of ours
        return
    scores = record.get("snapshots") if isinstance(record, dict) else None
    if not isinstance(scores, dict):  # config.json and other files: no scores by step
        return
    later = {k: v for k, v in scores.items() if k.isdigit() and int(k) > step}
    if not later:
        return
    aside = path.with_name(f"{path.stem}.set_aside.jsonl")
    with open(aside, "a") as f:  # appended and synced before the scores file shrinks
        f.write("".join(json.dumps({"outer_step": int(k), "task": record.get("task"), "score": v}) + "\n"
                        for k, v in sorted(later.items(), key=lambda item: int(item[0]))))
        f.flush()
        os.fsync(f.fileno())
    write_json(path, {**record, "snapshots": {k: v for k, v in scores.items() if k not in later}})
    logger.info(f"moved {len(later)} score(s) of snapshots after outer step {step} from {path.name} to {aside.name}")
