"""What the project tells the person running it goes through Python's logging.

Each module logs to its own ``logger = logging.getLogger(__name__)``. An entry point calls
``setup()`` once (again, to change the stream); from then on process 0 prints each message as it
is, one per line, to stdout (stderr for a tool whose stdout is its output), through tqdm while a
progress bar is shown, so a message never breaks the bar. The other processes of a multi-host
run print nothing unless CELO2_DEBUG is set; then their messages come too, each prefixed with
its process. Without setup() (the project used as a library, a test) messages under WARNING are
not shown.
"""
from __future__ import annotations

import logging
import os
import sys

# The loggers of the project's packages and entry points (a script run as such is __main__).
PROJECT_LOGGERS = ("recipes", "scripts", "train", "__main__")


def _shown_bar():
    """tqdm's bar class while one of its bars is shown (a disabled bar does not count), else None."""
    std = sys.modules.get("tqdm.std")
    bar = getattr(std, "tqdm", None)
    return bar if bar is not None and getattr(bar, "_instances", None) else None


class _Lines(logging.Handler):
    """Each message as one line on sys.stdout or sys.stderr, looked up when it is written (so a
    replaced stream, as a test's capture, receives it)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.stream_name, self.prefix = "stdout", ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.prefix + self.format(record)
            stream = getattr(sys, self.stream_name)
            bar = _shown_bar()
            if bar is not None:
                bar.write(message, file=stream)  # clears the bar, writes, redraws it
            else:
                stream.write(message + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


_handler = _Lines()


def setup(stream: str = "stdout", process_index: int = 0) -> None:
    """Shows the project's messages on ``stream`` ("stdout" or "stderr") from process 0, and from
    ``process_index`` > 0 only with CELO2_DEBUG set. Idempotent."""
    _handler.stream_name = stream
    shown = process_index == 0 or bool(os.environ.get("CELO2_DEBUG"))
    _handler.setLevel(logging.INFO if shown else logging.CRITICAL + 1)
    _handler.prefix = f"[process {process_index}] " if process_index else ""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the root logger's handlers (orbax sets one up) would repeat it on stderr
        if _handler not in logger.handlers:
            logger.addHandler(_handler)
