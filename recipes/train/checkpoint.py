"""Orbax checkpoints of the train state, plus a JSON record (step, config) beside it.

Saves are asynchronous (training continues while arrays are written) and atomic (orbax
writes into a temporary directory and renames it when complete); only the last
``keep`` are kept. The optimizer state is stored as its flat list of leaves so any optax
state (NamedTuples, masked branches) round-trips; its structure comes from the abstract
state given to ``restore``.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from data.files import move_aside

logger = logging.getLogger(__name__)


def _saveable(state: dict) -> dict:
    leaves = jax.tree.leaves(state["opt_state"])
    return {**state, "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}}


_TENSORSTORE_READ_ERROR = re.compile(r"[A-Z_]+: Error (opening|reading) ")


class _UnretrievedReadErrors(logging.Filter):
    """The same orphaned reads when their task or future is collected first: asyncio logs each as
    "Task (or Future) exception was never retrieved". Only tensorstore's read errors are dropped
    ("OUT_OF_RANGE: Error reading ..."); any other unretrieved error is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(("Task exception was never retrieved",
                                               "Future exception was never retrieved")):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and _TENSORSTORE_READ_ERROR.match(str(error)))


def drop_orphaned_read_errors() -> None:
    """From now on in this process, drops the errors a failed restore leaves behind: orbax gives up
    on a damaged checkpoint while other array reads are still in flight, and each of them, finishing
    up to seconds later, reports back to the closed event loop as an unraisable "Event loop is
    closed" RuntimeError or, collected sooner, is logged by asyncio as an unretrieved exception:
    dozens of tracebacks on stderr that would bury the one line saying what happened. Every other
    unraisable error and asyncio message is shown as before."""
    shown = sys.unraisablehook
    if getattr(shown, "drops_closed_loop_errors", False):
        return
    logging.getLogger("asyncio").addFilter(_UnretrievedReadErrors())

    def hook(unraisable) -> None:
        if not (unraisable.exc_type is RuntimeError and unraisable.object is None
                and str(unraisable.exc_value) == "Event loop is closed"):
            shown(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a file-size limit, permissions)."""


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.directory = Path(directory).absolute()
        # Handlers named up front, so a fresh process can read a checkpoint's metadata before restoring.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self._writing = None  # the step whose asynchronous save may still be under way
        drop_orphaned_read_errors()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """The steps of the checkpoints present, newest first."""
        return sorted(self._manager.all_steps(), reverse=True)

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Starts an asynchronous save; a later save or close() waits for it. Orbax copies the
        arrays to host memory before returning, so the next (state-donating) step is safe.
        A failed write (this one or the one before) raises CheckpointWriteError."""
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saveable(state)), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as error:
            raise self._write_failure(error, self._writing or step) from error
        self._writing = step

    def saved_abstract(self, steps: list[int], sharding) -> dict | None:
        """The state's shapes and dtypes as saved, placed by ``sharding``, from the first of ``steps``
        whose record of them is readable (one run's checkpoints share one layout); None if none is."""
        for step in steps:
            try:
                saved = self._manager.item_metadata(step)["state"]
            except Exception:  # a damaged record: restoring that step fails too, and restore_newest says so
                continue
            return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)
        return None

    def check(self) -> None:
        """Raises CheckpointWriteError as soon as a save under way has failed (cheap: no waiting)."""
        try:
            self._manager.check_for_errors()
        except Exception as error:
            raise self._write_failure(error, self._writing) from error

    def wait(self) -> None:
        """Waits for the save under way; CheckpointWriteError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_failure(error, self._writing) from error
        self._writing = None

    def _write_failure(self, error: Exception, step: int | None) -> CheckpointWriteError:
        text = " ".join(str(error).split())
        code = re.search(r"os_error_code='(\d+)'", text)  # tensorstore's wording of an OSError
        reason = (os.strerror(int(code.group(1))) if code else
                  error.strerror if isinstance(error, OSError) and error.strerror else text[:300])
        older = [s for s in self.steps() if s != step]
        kept = (f"the checkpoint of step {older[0]} is intact and a rerun resumes from it" if older
                else "no earlier checkpoint exists, so a rerun starts afresh")
        return CheckpointWriteError(f"could not write the checkpoint of step {step} in {self.directory}: "
                                    f"{reason}; {kept}. Free space (or raise the file-size limit) and rerun")

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

    def restore_newest(self, abstract: dict, check_meta=None) -> tuple[int | None, dict | None]:
        """(step, state) of the newest checkpoint that restores completely, or (None, None).

        A checkpoint that fails to restore (truncated file, missing item, garbled metadata) is
        moved aside to ``<directory>.damaged/<step>``, never deleted, and the next older one is tried.
        ``check_meta(meta)`` may refuse a readable checkpoint by raising ConfigError (written under
        other settings); that error propagates and nothing is moved.
        """
        for step in self.steps():
            try:
                meta = self.read_meta(step)
            except Exception as error:  # orbax raises many types for a damaged directory
                self._set_aside(step, error)
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                state = self.restore(step, abstract)
                jax.block_until_ready(state)
                return step, state
            except Exception as error:
                self._set_aside(step, error)
        return None, None

    def _set_aside(self, step: int, error: Exception) -> None:
        aside = move_aside(self.directory / str(step),
                           self.directory.with_name(self.directory.name + ".damaged"), str(step))
        self._manager.reload()
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        logger.info(f"checkpoint {step} does not restore ({type(error).__name__}: {reason}); moved it to {aside}")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # a failed write is already being reported by wait()
                pass
