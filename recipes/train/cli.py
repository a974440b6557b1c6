"""How the command-line entry points end: a result, or one `error:` line and a non-zero exit.

Mistakes in a config, a path, data or weights each come with a message that says what to
fix, so one line suffices; CELO2_DEBUG=1 shows the traceback as well. Entry points that take
--section.key=value overrides list every config key in their --help (``add_config_help``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import typing
from typing import Callable

EXIT_CODES = {"finished": 0, "error": 1, "nonfinite": 3}  # stopped by a signal: 128 + its number


def add_config_help(parser: argparse.ArgumentParser, config_class: Callable[[], type]) -> None:
    """-h/--help (of a parser made with add_help=False) that also lists every key of ``config_class()``,
    the config its overrides set; the class is imported only when help is asked for."""
    class Help(argparse.Action):
        def __call__(self, parser, *_):
            parser.epilog = keys_help(config_class())
            parser.print_help()
            parser.exit()

    parser.add_argument("-h", "--help", nargs=0, action=Help, help="show this help, with every config key, and exit")


def ordinary_errors() -> tuple[type[BaseException], ...]:
    from data.loader import DataSizeError
    from data.shards import ShardError
    from data.tokenizer import TokenizerUnavailableError
    from recipes.optim.theta import ThetaFormatError
    from model.config_base import ConfigError
    from recipes.train.checkpoint import CheckpointWriteError

    # OSError last: a full disk, a file-size limit or permissions anywhere else get one line too.
    return (ConfigError, DataSizeError, FileNotFoundError, NotADirectoryError, ShardError, ThetaFormatError,
            TokenizerUnavailableError, CheckpointWriteError, OSError)


def quiet_library_logs() -> None:
    """Libraries' own error logs (orbax's through absl) would repeat, in pages, what the one error
    line says; CELO2_DEBUG=1 keeps them."""
    if not os.environ.get("CELO2_DEBUG"):
        import logging

        logging.getLogger("absl").setLevel(logging.CRITICAL)


def one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"could not use {error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def run_main(main: Callable, argv=None, extra: tuple[type[BaseException], ...] = ()) -> int:
    """Calls main(argv); an ordinary error (or one of ``extra``) becomes one line on stderr and exit 1."""
    try:
        result = main(argv)
    except (*ordinary_errors(), *extra) as error:
        if os.environ.get("CELO2_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_CODES["error"]
    return result if isinstance(result, int) else EXIT_CODES["finished"]


_STOPPED_AT_ONCE = {
    "before": "before training began: stopped, nothing was trained; rerun to start or resume",
    "during": "during training, after a stop was asked for: interrupted at once, without a new checkpoint; "
              "rerun to resume from the last one",
    "after": "after training: its checkpoint and summary.json were written before it came",
    "failed": "while training ended on an error: stopped; rerun to resume from the last trusted checkpoint"}


def exit_after_training(main: Callable) -> None:
    """Runs a trainer's main() and exits as a scheduler expects: 0 when finished; 128 + the signal's
    number when a signal stopped it after saving (so it is rerun); 3 after too many non-finite
    steps; 1 with one `error:` line for any ordinary error."""
    import signal

    from recipes.train.checkpoint import CheckpointWriteError
    from recipes.train.health import NonFiniteError
    from recipes.train.stop import StopNow, StopRequest, stop_at_once_on_signals

    stop_at_once_on_signals()
    StopRequest.process_exits_after = True
    quiet_library_logs()
    try:
        result = main()
        # All is written: a late SIGTERM must not turn the exit below into a death by signal (one
        # that came before this line is a StopNow, as after training).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except StopNow as stop:
        print(f"{stop.signal_name} received " + _STOPPED_AT_ONCE[stop.phase], file=sys.stderr, flush=True)
        os._exit(128 + stop.signal_number)  # orbax's threads may hold the interpreter; nothing is left to write
    except (*ordinary_errors(), NonFiniteError) as error:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the exit code below is the error's
        if os.environ.get("CELO2_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        code = EXIT_CODES["nonfinite"] if isinstance(error, NonFiniteError) else EXIT_CODES["error"]
        if isinstance(error, (OSError, CheckpointWriteError)):
            # orbax's writer threads would print their own tracebacks while the interpreter shuts
            # down; the line above says it all, and everything is closed.
            os._exit(code)
        sys.exit(code)
    # A finished run exits 0 even when a signal came during its last step (else reruns never end).
    if result.get("stopped_by") and not result.get("finished"):
        sys.exit(128 + int(getattr(signal, result["stopped_by"], signal.SIGTERM)))


def keys_help(cls, prefix: str = "") -> str:
    """Every key of config class ``cls``, one a line: key=default, what it allows, its description."""
    from model.config_base import allowed, to_dict  # pydantic: loaded only when help is asked for

    lines = [] if prefix else ["config keys, set as --KEY=VALUE (a recipe's values replace these defaults):"]
    lines += [_row(prefix + name, text) for name, text in getattr(cls, "EXTRA_KEYS", {}).items()]
    for name, field in cls.__pydantic_fields__.items():
        key, args = prefix + name, typing.get_args(field.annotation)
        if dataclasses.is_dataclass(field.annotation):
            lines.append(keys_help(field.annotation, f"{key}."))
            continue
        default = "  (required)" if field.is_required() else "" if field.default_factory else \
            "=" + json.dumps(to_dict(field.default))  # as it would be typed after --KEY=
        lines.append(_row(key + default, "; ".join(filter(None, [allowed(field.annotation, field),
                                                                 field.description]))))
        if args and dataclasses.is_dataclass(args[0]):  # a list of config classes: their keys
            lines.append(keys_help(args[0], f"{key}[]."))
    return "\n".join(lines)


def _row(left: str, text: str, width: int = 40) -> str:
    head = f"  {left}".ljust(width) if len(left) + 3 <= width else f"  {left}\n" + " " * width
    return head + ("\n" + " " * width).join(textwrap.wrap(text, 120 - width))
