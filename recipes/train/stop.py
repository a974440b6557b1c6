"""Stopping a run cleanly: SIGTERM or SIGINT becomes a flag the loop polls (StopRequest is a hook
of recipes.train.loop), so it saves and exits.

Both trainers (train.py and meta-training) exit with 128 + the signal's number after saving,
as a scheduler expects of a job the signal ended.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

logger = logging.getLogger(__name__)


class StopNow(BaseException):
    """A signal that stops the process at once: a SIGTERM or SIGINT before a training loop began or
    after it ended, or a second Ctrl-C during one. ``phase`` says which ("before", "during", "after",
    or "failed": after a loop that ended on an error). A BaseException, as KeyboardInterrupt is, so
    no library's `except Exception` swallows it; the locks and files it unwinds through are released
    on the way out."""

    def __init__(self, signum: int, phase: str):
        self.signal_name, self.signal_number = signal.Signals(signum).name, int(signum)
        self.phase = phase
        super().__init__(self.signal_name)


def stop_at_once_on_signals() -> None:
    """From a trainer's first line: a signal raises StopNow wherever the process is, until a loop's
    StopRequest takes over (it turns signals into a checkpoint and a clean exit), and again after."""
    def stop_now(signum, frame):
        raise StopNow(signum, phase=StopRequest.phase)

    if threading.current_thread() is threading.main_thread():
        for sig in StopRequest.SIGNALS:
            signal.signal(sig, stop_now)


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the training loop polls, so it can save and exit: as a hook
    (every step), it stops the loop once every process agrees (agreed), asking the others every
    ``check_every`` steps.

    A second Ctrl-C falls through to the previous handler: a person asking to stop now. A repeated
    SIGTERM changes nothing: one stop can bring several (a scheduler signalling every process of a
    job; Linux's parent-death signal, sent once per thread a dying parent had), and none may cost
    the checkpoint the first one asked for.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    phase = "before"  # "during" once a loop has taken the signals; "after" or "failed" once it gave them back
    # Set by a trainer's command line, whose process ends after its loop: once a loop stopped for a
    # SIGTERM, more are ignored to the exit, which then stays 143. A library caller keeps its handlers.
    process_exits_after = False

    def __init__(self, check_every: int = 1):
        self.signal_name: str | None = None
        self.signal_number: int | None = None  # None too when another process was signalled
        self.check_every = check_every
        self.stopped_by: str | None = None  # the signal that stopped the loop, once one did
        self._previous: dict = {}

    def __call__(self, info) -> None:
        if self.agreed(check_others=info.step % self.check_every == 0):
            self.stopped_by = self.signal_name
            info.stop(self.signal_name)

    def announce(self, info) -> None:
        """When the loop stops: says so, if this stopped it."""
        if self.stopped_by is not None:
            logger.info(f"{self.stopped_by} received: saving a checkpoint at step {info.step} and exiting")

    def report(self, info) -> dict:
        """For the run's summary: what stopped it."""
        return {"stopped_by": self.stopped_by}

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
            if signum == signal.SIGINT and callable(previous):
                previous(signum, frame)
            return
        self.signal_name = signal.Signals(signum).name
        self.signal_number = int(signum)

    def __enter__(self) -> StopRequest:
        StopRequest.phase = "during"
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        StopRequest.phase = "after" if exc_type is None else "failed"  # before a signal can see the old one
        for sig, previous in self._previous.items():
            hold = sig == signal.SIGTERM and self.signal_name is not None and StopRequest.process_exits_after
            signal.signal(sig, signal.SIG_IGN if hold else previous)
        self._previous.clear()
