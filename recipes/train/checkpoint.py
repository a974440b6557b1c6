"""Orbax checkpoints of the train state, plus a JSON record (step, config) beside it.

Saves are asynchronous (training continues while arrays are written) and atomic (orbax
writes into a temporary directory and renames it when complete); only the last
``keep`` are kept. The optimizer state is stored as its flat list of leaves so any optax
state (NamedTuples, masked branches) round-trips; its structure comes from the abstract
state given to ``restore``.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import jax
import numpy as np
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
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Starts an asynchronous save; a later save or wait() waits for it. Orbax copies the
        arrays to host memory before returning, so the next (state-donating) step is safe."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_saveable(state)), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract: dict) -> tuple[dict, dict]:
        """(state, meta) saved at ``step``, laid out like ``abstract`` (arrays with shardings)."""
        leaves, treedef = jax.tree.flatten(abstract["opt_state"])
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_saveable(abstract)), meta=ocp.args.JsonRestore()))
        state = dict(restored["state"])
        opt_leaves = [state["opt_state"][f"{i:05d}"] for i in range(len(leaves))]
        state["opt_state"] = jax.tree.unflatten(treedef, opt_leaves)
        return state, dict(restored["meta"])

    def restore_newest(self, abstract: dict, log=print) -> tuple[int | None, dict | None]:
        """(step, state) of the newest checkpoint that restores completely, or (None, None).

        A checkpoint that fails to restore (truncated file, missing item, garbled metadata) is
        moved aside to ``<directory>.damaged/<step>``, never deleted, and the next older one is tried.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, _ = self.restore(step, abstract)
                jax.block_until_ready(state)
                return step, state
            except Exception as error:  # orbax raises many types for a damaged directory
                aside = move_aside(self.directory / str(step),
                                   self.directory.with_name(self.directory.name + ".damaged"), str(step))
                self._manager.reload()
                reason = " ".join(str(error).split())[:200] or type(error).__name__
                log(f"checkpoint {step} does not restore ({type(error).__name__}: {reason}); moved it to {aside}")
        return None, None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class RunDirLock:
    """An exclusive lock on a run directory for as long as a process trains into it.

    Two trainers writing one directory would double every metrics row and race their
    checkpoints; the second is refused. The lock is an OS file lock, released when the
    process ends however it ends, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self, log=print) -> None:
        """Takes the lock, or raises RuntimeError naming the live process that holds it. A lock
        file left by a process that died is taken over with a note."""
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RuntimeError(f"{self.path.parent} is in use by {holder}: wait for it to finish or stop it, "
                               "or train into another train.out_dir") from None
        handle.seek(0)
        left = handle.read().strip()
        if left and left != f"pid {os.getpid()}":
            log(f"note: {self.path} was left by {left}, which ended without releasing it; taking it over")
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


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the training loop polls, so it can save and exit.

    A second signal of the same kind falls through to the previous handler (e.g. a second
    Ctrl-C interrupts at once).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def agreed(self, check_others: bool) -> bool:
        """Whether to stop now. With several processes every one must stop at the same step
        (saving is collective), so they share their flags, at steps where check_others is True
        on all of them; a process signalled alone stops at the next such step."""
        if jax.process_count() == 1:
            return bool(self)
        if not check_others:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(bool(self)))
        if flags.max() and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(flags.max())

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            return
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


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
