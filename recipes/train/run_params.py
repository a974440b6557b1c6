"""The parameters of a run directory's checkpoint, for the tools that read a run without training it
(scripts/sample.py, scripts/export_hf.py), on one device whatever mesh the run was trained on.

Without a step, the checkpoint is found exactly as train.py finds the one it resumes from
(Checkpointer.restore_newest): one that does not restore is moved aside to checkpoints.damaged/,
never deleted, and the next older one is taken. A step asked for is restored or refused in one line.
"""
from __future__ import annotations

from pathlib import Path

import jax

from recipes.errors import ConfigError
from recipes.train.checkpoint import Checkpointer
from recipes.train.cli import one_line


def load_run_params(run_dir: str | Path, step: int | None = None, log=print):
    """(config, params as a dict of arrays on one device, step) of a run directory's newest checkpoint
    that restores, or of checkpoint ``step``. ``log`` receives the lines about damaged checkpoints."""
    from recipes.train.run_dir import saved_settings

    run_dir = Path(run_dir)
    config = saved_settings(run_dir, log) if run_dir.is_dir() else None  # the checkpoints' own record first
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
            return config, _restore_asked(checkpoints, step, abstract)["params"], step
        found, state = checkpoints.restore_newest(abstract, log=log)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {directory} restores (each was moved to "
                                    f"{directory.name}.damaged/): train again, or restore the checkpoints from a copy")
        if found != steps[0]:
            log(f"using checkpoint {found}, the newest of {run_dir} that restores")
        return config, state["params"], found
    finally:
        checkpoints.close()


def _restore_asked(checkpoints: Checkpointer, step: int, abstract: dict) -> dict:
    """Checkpoint ``step``, or one line saying it is damaged; a step asked for is never moved aside."""
    try:
        return jax.block_until_ready(checkpoints.restore(step, abstract))
    except Exception as error:  # orbax raises many types for a damaged directory
        raise ConfigError(f"checkpoint {step} in {checkpoints.directory} does not restore "
                          f"({type(error).__name__}: {one_line(error)[:200]}); leave out --step to take the newest one "
                          "that restores") from None
