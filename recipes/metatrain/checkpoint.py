"""Saving and resuming meta-training.

An output directory holds:
  config.json             the meta-training settings
  theta.state             the latest theta in the official Celo2 format
  thetas/theta_NNNNNNN.state  snapshots for picking a checkpoint by validation
  checkpoint/state.npz    everything needed to resume (theta, outer optimizer
                          state, step, PES populations, RNG), as the leaves of
                          one pytree whose structure the config determines
  checkpoint/meta.json    step, leaf count and the settings it was written under
  metrics.jsonl           one JSON record per logged outer step

Writes go to a temporary name first and are renamed into place, so a run
killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from recipes.celo2 import save_checkpoint
from recipes.metatrain.config import FamilyConfig, MetaTrainConfig

CHECKPOINT_DIR = "checkpoint"
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


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode()))


def config_record(config: MetaTrainConfig) -> dict:
    record = config.to_dict()
    record["resolved_families"] = [dataclasses.asdict(f) for f in config.all_families()]
    return json.loads(json.dumps(record, default=list))


def has_checkpoint(out_dir: str | Path) -> bool:
    return (Path(out_dir) / CHECKPOINT_DIR / META_FILE).is_file()


def save(out_dir: str | Path, state: MetaState, config: MetaTrainConfig) -> Path:
    """Writes the resumable state and the official-format theta; returns the checkpoint dir."""
    out = Path(out_dir)
    ckpt = out / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(state))]
    _atomic_write(ckpt / STATE_FILE, lambda f: np.savez(f, *leaves))
    record = config_record(config)
    write_json(ckpt / META_FILE, {"step": int(state.step), "num_leaves": len(leaves),
                                  **{k: record[k] for k in _MUST_MATCH}, "resolved_families": record["resolved_families"]})
    save_checkpoint(jax.device_get(state.theta), out / "theta.state")
    return ckpt


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


def restore(out_dir: str | Path, target: MetaState, config: MetaTrainConfig) -> MetaState:
    """The saved state, checked leaf by leaf against ``target`` (arrays or shape structs)."""
    ckpt = Path(out_dir) / CHECKPOINT_DIR
    meta = json.loads((ckpt / META_FILE).read_text())
    record = config_record(config)
    changed = [k for k in _MUST_MATCH if _with_new_defaults(k, meta.get(k)) != record[k]]
    if changed:
        raise ValueError(
            f"{ckpt} was written with different {changed} settings than this config; these fix the "
            "problem and the state's layout, so resume with the original settings or pick a new metatrain.out_dir")
    target_leaves, treedef = jax.tree.flatten(target)
    with np.load(ckpt / STATE_FILE) as data:
        saved = [data[f"arr_{i}"] for i in range(len(data.files))]
    if len(saved) != len(target_leaves):
        raise ValueError(f"{ckpt}: {len(saved)} saved arrays, but this config's state has {len(target_leaves)}")
    for i, (a, t) in enumerate(zip(saved, target_leaves)):
        if tuple(a.shape) != tuple(t.shape) or np.dtype(a.dtype) != np.dtype(t.dtype):
            raise ValueError(f"{ckpt}: array {i} is {a.dtype}{list(a.shape)}, expected {np.dtype(t.dtype)}{list(t.shape)}")
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in saved])


def snapshot_theta(out_dir: str | Path, theta, step: int) -> Path:
    path = Path(out_dir) / "thetas" / f"theta_{step:07d}.state"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(jax.device_get(theta), path)
