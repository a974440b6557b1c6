"""The parameters of a run directory's checkpoint, for the tools that read a run without training it
(scripts/sample.py, scripts/export_hf.py), on one device whatever mesh the run was trained on.

Without a step, the checkpoint is found exactly as train.py finds the one it resumes from
(Checkpointer.restore_newest): one that does not restore is moved aside to checkpoints.damaged/,
never deleted, and the next older one is taken. A step asked for is restored or refused in one line.
The settings are those the checkpoint restored records it was trained with (a rerun may have changed
them since, e.g. the head count, which gives the same arrays another function).
"""
from __future__ import annotations

import logging
from pathlib import Path

import jax

from model.config_base import ConfigError
from recipes.train.checkpoint import Checkpointer
from recipes.train.cli import one_line

logger = logging.getLogger(__name__)


def load_run_params(run_dir: str | Path, step: int | None = None):
    """(config, params as a dict of arrays on one device, step) of a run directory's newest checkpoint
    that restores, or of checkpoint ``step``; config is the settings that checkpoint was trained with.
    Damaged checkpoints passed over are logged."""
    from recipes.train.run_dir import saved_settings

    run_dir = Path(run_dir)
    config = saved_settings(run_dir) if run_dir.is_dir() else None  # the checkpoints' own record first
    if config is None:
        raise FileNotFoundError(f"{run_dir} is not a run directory (no checkpoint records and no config.yaml): "
                                "pass train.out_dir of a run")
    directory = run_dir / "checkpoints"
    if not directory.is_dir():  # checked first: the checkpointer would create it
        raise FileNotFoundError(f"{directory} holds no checkpoint yet: train first")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpoints = Checkpointer(directory, keep=config.train.keep_checkpoints)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no checkpoint yet: train first")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{directory} holds no checkpoint at step {step}; its steps are "
                                    f"{', '.join(map(str, sorted(steps)))}")
        abstract = checkpoints.saved_abstract(steps if step is None else [step, *steps], device)
        if abstract is None:
            raise FileNotFoundError(f"no checkpoint in {directory} restores (none of steps "
                                    f"{', '.join(map(str, steps))} has a readable record of its arrays): "
                                    "train again, or restore the checkpoints from a copy")
        if step is not None:
            params = _restore_asked(checkpoints, step, abstract)["params"]
            return checkpoint_settings(checkpoints, step, config), params, step
        found, state = checkpoints.restore_newest(abstract)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {directory} restores (each was moved to "
                                    f"{directory.name}.damaged/): train again, or restore the checkpoints from a copy")
        if found != steps[0]:
            logger.info(f"using checkpoint {found}, the newest of {run_dir} that restores")
        return checkpoint_settings(checkpoints, found, config), state["params"], found
    finally:
        checkpoints.close()


def checkpoint_settings(checkpoints: Checkpointer, step: int, fallback):
    """The settings checkpoint ``step`` records it was trained with, parsed as saved_settings parses
    them; ``fallback`` (saved_settings') for a checkpoint written before records carried them."""
    from recipes.train import config as config_lib

    try:
        settings = checkpoints.read_meta(step).get("config")
        if settings:
            return config_lib.Config.from_dict(settings)
    except Exception as error:  # orbax raises many types for a garbled record; older names raise ConfigError
        logger.info(f"note: checkpoint {step} has no readable record of its settings ({type(error).__name__}: "
                    f"{one_line(error)[:200]}); using the run directory's newest record")
    return fallback


def _restore_asked(checkpoints: Checkpointer, step: int, abstract: dict) -> dict:
    """Checkpoint ``step``, or one line saying it is damaged; a step asked for is never moved aside."""
    try:
        return jax.block_until_ready(checkpoints.restore(step, abstract))
    except Exception as error:  # orbax raises many types for a damaged directory
        raise ConfigError(f"checkpoint {step} in {checkpoints.directory} does not restore "
                          f"({type(error).__name__}: {one_line(error)[:200]}); leave out --step to take the newest one "
                          "that restores") from None
