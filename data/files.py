"""Writing files so that a reader, or a run killed mid-write, sees the old content or the new, never half.

A file is written under a temporary name in its own directory (a rename is atomic only within
one file system), flushed to disk, then renamed over the target. Checkpoint directories are
replaced by directory renames (``rotate_directories``), and what does not restore is moved
aside (``move_aside``), never deleted. Every layer writes through here; data/ is the lowest.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` for a writer that wants a file name (a library's save function):
    once the block ends without an error the file there is flushed to disk and renamed over ``path``;
    otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    # A fresh name per writer, so two processes writing one file never share a temporary.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[IO[bytes]], Any]) -> Path:
    """Replaces ``path`` with ``content``: bytes, text (UTF-8), or a function that writes to the binary file."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
    return Path(path)


def write_json(path: str | os.PathLike, value, **dumps_args) -> Path:
    """``value`` as indented JSON with sorted keys and a trailing newline, written atomically."""
    return atomic_write(path, json.dumps(value, **{"indent": 2, "sort_keys": True, **dumps_args}) + "\n")


def rotate_directories(new: Path, current: Path, previous: Path) -> None:
    """A complete ``new`` directory becomes ``current``; the old ``current`` becomes ``previous``
    (replacing it). Cut short at any point, one complete directory remains among the three."""
    if current.exists():
        if previous.exists():
            shutil.rmtree(previous)
        current.rename(previous)
    new.rename(current)


def move_aside(path: Path, aside_dir: Path, name: str) -> Path:
    """Moves ``path`` to ``aside_dir``/``name`` (a numbered variant if taken) and returns where it went:
    what does not restore is kept for inspection."""
    aside_dir.mkdir(parents=True, exist_ok=True)
    target, n = aside_dir / name, 1
    while target.exists():
        target, n = aside_dir / f"{name}.{n}", n + 1
    path.rename(target)
    return target
