"""Saving and resuming meta-training.

An output directory holds:
  config.json             the meta-training settings
  theta.state             the latest theta in the official Celo2 format
  thetas/theta_NNNNNNN.state  snapshots for picking a checkpoint by validation
  checkpoint/state.npz    everything needed to resume (theta, outer optimizer
                          state, step, PES populations, RNG), as the leaves of
                          one pytree whose structure the config determines
  checkpoint/meta.json    step, leaf count and the settings it was written under
  checkpoint.previous/    the checkpoint before it, the fallback if the newest is damaged
  metrics.jsonl           one JSON record per logged outer step

A checkpoint is written whole into checkpoint.new/ and then renamed into place,
so a run killed at any moment leaves at least one complete checkpoint. Resume
takes the newest that restores; a damaged one is moved to checkpoint.damaged/,
never deleted.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from recipes.optim.theta import save_checkpoint
from recipes.errors import ConfigError
from recipes.files import atomic_write, move_aside, rotate_directories, write_json
from recipes.metatrain.config import FamilyConfig, MetaTrainConfig

CHECKPOINT_DIR = "checkpoint"
NEW_DIR, PREVIOUS_DIR, DAMAGED_DIR = "checkpoint.new", "checkpoint.previous", "checkpoint.damaged"
STATE_FILE = "state.npz"
META_FILE = "meta.json"
# Changing these changes the state's structure or the problem being optimized.
_MUST_MATCH = ("pes", "inner", "families", "lm_sampler")


class MetaState(NamedTuple):
    theta: Any
    opt_state: Any
    step: Any  # int32 scalar: outer steps done
    populations: dict  # family name -> PESState
    rng: Any  # uint32 key data


def config_record(config: MetaTrainConfig) -> dict:
    record = config.to_dict()
    record["resolved_families"] = [dataclasses.asdict(f) for f in config.all_families()]
    return json.loads(json.dumps(record, default=list))


def _candidates(out_dir: Path) -> list[Path]:
    """Checkpoint directories that hold a meta.json (a save cut short may leave any of them)."""
    return [out_dir / name for name in (CHECKPOINT_DIR, NEW_DIR, PREVIOUS_DIR)
            if (out_dir / name / META_FILE).is_file()]


def has_checkpoint(out_dir: str | Path) -> bool:
    return bool(_candidates(Path(out_dir)))


def save(out_dir: str | Path, state: MetaState, config: MetaTrainConfig) -> Path:
    """Writes the resumable state and the official-format theta; returns the checkpoint dir.

    The new checkpoint is complete in checkpoint.new/ before checkpoint/ becomes
    checkpoint.previous/ and checkpoint.new/ becomes checkpoint/.
    """
    out = Path(out_dir)
    ckpt, new, previous = out / CHECKPOINT_DIR, out / NEW_DIR, out / PREVIOUS_DIR
    if new.exists():
        shutil.rmtree(new)  # an unfinished save: the complete checkpoints are the others
    new.mkdir(parents=True)
    leaves = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(state))]
    atomic_write(new / STATE_FILE, lambda f: np.savez(f, *leaves))
    record = config_record(config)
    write_json(new / META_FILE, {"step": int(state.step), "num_leaves": len(leaves),
                                 **{k: record[k] for k in _MUST_MATCH}, "resolved_families": record["resolved_families"]})
    rotate_directories(new, ckpt, previous)
    save_checkpoint(jax.device_get(state.theta), out / "theta.state")
    return ckpt


def newest_meta_state(out_dir: str | Path, target: MetaState, config: MetaTrainConfig,
                   log: Callable[[str], None] = print) -> MetaState | None:
    """The newest checkpoint that restores completely, or None when there is none.

    One that fails to load (a truncated or missing file, garbled metadata) is moved to
    checkpoint.damaged/ with a note and the next older one is tried; one written under
    other settings is refused (ConfigError), since resuming it would change the problem.
    """
    out = Path(out_dir)

    def step_of(path: Path) -> int:
        try:
            return int(json.loads((path / META_FILE).read_text())["step"])
        except (ValueError, KeyError, TypeError, OSError):
            return -1  # unreadable: tried last, and found damaged

    for path in sorted(_candidates(out), key=step_of, reverse=True):
        try:
            return restore(path, target, config)
        except ConfigError:  # readable, but another problem or layout: not damage
            raise
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
            # what numpy, zipfile and json raise for a truncated, missing or garbled file
            aside = move_aside(path, out / DAMAGED_DIR, f"{path.name}.{step_of(path)}")
            log(f"checkpoint {path.name} does not restore ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:200]}); moved it to {aside}")
    return None


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


def restore(ckpt: str | Path, target: MetaState, config: MetaTrainConfig) -> MetaState:
    """The state saved in the checkpoint directory ``ckpt``, checked leaf by leaf against ``target``
    (arrays or shape structs)."""
    ckpt = Path(ckpt)
    meta = json.loads((ckpt / META_FILE).read_text())
    record = config_record(config)
    changed = [k for k in _MUST_MATCH if _with_new_defaults(k, meta.get(k)) != record[k]]
    if changed:
        raise ConfigError(
            f"{ckpt} was written with different {changed} settings than this config; these fix the "
            "problem and the state's layout, so resume with the original settings or pick a new metatrain.out_dir")
    target_leaves, treedef = jax.tree.flatten(target)
    with np.load(ckpt / STATE_FILE) as data:
        saved = [data[f"arr_{i}"] for i in range(len(data.files))]
    if len(saved) != len(target_leaves):
        raise ConfigError(f"{ckpt}: {len(saved)} saved arrays, but this config's state has {len(target_leaves)}")
    for i, (a, t) in enumerate(zip(saved, target_leaves)):
        if tuple(a.shape) != tuple(t.shape) or np.dtype(a.dtype) != np.dtype(t.dtype):
            raise ConfigError(f"{ckpt}: array {i} is {a.dtype}{list(a.shape)}, expected "
                              f"{np.dtype(t.dtype)}{list(t.shape)}")
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in saved])


def snapshot_theta(out_dir: str | Path, theta, step: int) -> Path:
    path = Path(out_dir) / "thetas" / f"theta_{step:07d}.state"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(jax.device_get(theta), path)
