"""Orbax checkpoints of the train state, plus a JSON record (step, config) beside it.

Saves are asynchronous (training continues while arrays are written) and atomic (orbax
writes into a temporary directory and renames it when complete); only the last
``keep`` are kept. The optimizer state is stored as its flat list of leaves so any optax
state (NamedTuples, masked branches) round-trips; its structure comes from the abstract
state given to ``restore``.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from recipes.files import move_aside


def _saveable(state: dict) -> dict:
    leaves = jax.tree.leaves(state["opt_state"])
    return {**state, "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}}


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.directory = Path(directory).absolute()
        # Handlers named up front, so a fresh process can read a checkpoint's metadata before restoring.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Starts an asynchronous save; a later save or close() waits for it. Orbax copies the
        arrays to host memory before returning, so the next (state-donating) step is safe."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_saveable(state)), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract: dict) -> dict:
        """The state saved at ``step``, laid out like ``abstract`` (arrays with shardings); its JSON
        record is read_meta's."""
        leaves, treedef = jax.tree.flatten(abstract["opt_state"])
        target = _saveable(abstract)
        # Entries the state no longer has (an unused "rng" key, in checkpoints written before it was
        # dropped) are restored too, since orbax restores whole trees only, and then left out.
        saved = self._manager.item_metadata(step)["state"]
        former = {key: jax.ShapeDtypeStruct(saved[key].shape, saved[key].dtype, sharding=abstract["step"].sharding)
                  for key in set(saved) - set(target)}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({**target, **former})))
        state = {key: value for key, value in restored["state"].items() if key not in former}
        opt_leaves = [state["opt_state"][f"{i:05d}"] for i in range(len(leaves))]
        state["opt_state"] = jax.tree.unflatten(treedef, opt_leaves)
        return state

    def read_meta(self, step: int) -> dict:
        """The JSON record saved beside the state at ``step``, without reading any array."""
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore_newest(self, abstract: dict, log=print, check_meta=None) -> tuple[int | None, dict | None]:
        """(step, state) of the newest checkpoint that restores completely, or (None, None).

        A checkpoint that fails to restore (truncated file, missing item, garbled metadata) is
        moved aside to ``<directory>.damaged/<step>``, never deleted, and the next older one is tried.
        ``check_meta(meta)`` may refuse a readable checkpoint by raising ConfigError (written under
        other settings); that error propagates and nothing is moved.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
            except Exception as error:  # orbax raises many types for a damaged directory
                self._set_aside(step, error, log)
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                state = self.restore(step, abstract)
                jax.block_until_ready(state)
                return step, state
            except Exception as error:
                self._set_aside(step, error, log)
        return None, None

    def _set_aside(self, step: int, error: Exception, log) -> None:
        aside = move_aside(self.directory / str(step),
                           self.directory.with_name(self.directory.name + ".damaged"), str(step))
        self._manager.reload()
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        log(f"checkpoint {step} does not restore ({type(error).__name__}: {reason}); moved it to {aside}")

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_run_params(run_dir: str | Path, step: int | None = None):
    """(config, params as a dict of arrays on one device, step) of a run directory's checkpoint
    (its latest unless ``step`` is given), whatever mesh it was trained on."""
    from recipes.train.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml): pass train.out_dir of a run")
    config = load_config(run_dir / "config.yaml")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # Handlers named for both items: otherwise orbax warns that the one not restored "could not be".
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(run_dir.absolute() / "checkpoints", item_handlers=handlers) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no checkpoint yet: train first")
        metadata = manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return config, restored["state"]["params"], step
