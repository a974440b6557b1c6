"""Token shard files: reading, writing and validating them.

Two layouts are read:
- headered shards, as written by modded-nanogpt (and by `data.prepare`): 256 little-endian int32
  (magic 20240520, version 1, token count, zeros), then the tokens as little-endian uint16;
- plain nanoGPT files (`train.bin`, `val.bin`): uint16 tokens and nothing else.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from data.presets import PRESETS

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
HEADER_DTYPE = np.dtype("<i4")
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the count as int32
# Tokens checked when a shard is opened (its head and tail): catches files that are not
# uint16 tokens at all without reading billions of tokens; windows are checked when read.
OPEN_CHECK_TOKENS = 1 << 16


class ShardError(ValueError):
    """A shard file that is corrupt, truncated, or holds tokens outside the vocabulary."""


@dataclass(frozen=True)
class Shard:
    """One memory-mapped shard: `tokens` is a read-only uint16 view of the file."""

    path: Path
    tokens: np.ndarray
    has_header: bool

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def encode_header(num_tokens: int) -> np.ndarray:
    if not 0 <= num_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens, got {num_tokens}")
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[:3] = (MAGIC, VERSION, num_tokens)
    return header


def read_header(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """(magic, version, token count) of a headered shard, without any validation."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < 12:
        raise ShardError(f"{path}: {len(raw)} bytes, too short to hold a shard header")
    magic, version, count = np.frombuffer(raw[:12], dtype=HEADER_DTYPE)
    return int(magic), int(version), int(count)


def has_magic(path: str | os.PathLike[str]) -> bool:
    # A plain uint16 GPT-2 file cannot start with MAGIC: its low half (55432) is not a GPT-2 token.
    with open(path, "rb") as f:
        first = f.read(4)
    return len(first) == 4 and int(np.frombuffer(first, dtype=HEADER_DTYPE)[0]) == MAGIC


def check_token_range(tokens: np.ndarray, vocab_size: int, path: Path, offset: int = 0) -> None:
    """Raise ShardError if any token is >= vocab_size (uint16 tokens cannot be negative)."""
    if tokens.size == 0 or vocab_size > np.iinfo(TOKEN_DTYPE).max:
        return
    if int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(np.asarray(tokens).reshape(-1) >= vocab_size))
        value = int(np.asarray(tokens).reshape(-1)[bad])
        raise ShardError(
            f"{path}: token id {value} at position {offset + bad} is outside the vocabulary "
            f"(size {vocab_size}). The file was made with another tokenizer or is corrupt: "
            "re-prepare it with `python -m data.prepare`, or pass the matching vocab_size."
        )


def open_shard(path: str | os.PathLike[str], *, header: bool | None = None, vocab_size: int | None = None) -> Shard:
    """Memory-map and validate one shard.

    header=True requires the modded-nanogpt header, False reads raw uint16, None decides by the
    magic number. With vocab_size, the first and last OPEN_CHECK_TOKENS tokens are range-checked.
    """
    path = Path(path)
    size = path.stat().st_size
    if header is None:
        header = has_magic(path)
    if header:
        if size < HEADER_BYTES:
            raise ShardError(
                f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header: the file is "
                "truncated. Re-download it or re-run `python -m data.prepare`."
            )
        magic, version, count = read_header(path)
        if magic != MAGIC:
            raise ShardError(
                f"{path}: wrong magic number {magic} (expected {MAGIC}): not a token shard, or corrupt. "
                "Re-create it with `python -m data.prepare`; a plain nanoGPT file (uint16 tokens, no "
                "header) must be named train.bin / val.bin."
            )
        if version != VERSION:
            raise ShardError(f"{path}: shard version {version} is not supported (expected {VERSION}).")
        expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
        if count < 0 or size != expected:
            raise ShardError(
                f"{path}: the header says {count} tokens ({expected} bytes) but the file has {size} "
                "bytes: it is truncated or corrupt. Re-download it or re-run `python -m data.prepare`."
            )
        offset = HEADER_BYTES
    else:
        if size % TOKEN_DTYPE.itemsize:
            raise ShardError(
                f"{path}: {size} bytes is not a whole number of uint16 tokens: the file is truncated "
                "or is not a token file."
            )
        count, offset = size // TOKEN_DTYPE.itemsize, 0
    if count == 0:
        raise ShardError(f"{path}: the shard holds no tokens. Delete it or re-run `python -m data.prepare`.")
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=offset, shape=(count,))
    if vocab_size is not None:
        check_token_range(tokens[:OPEN_CHECK_TOKENS], vocab_size, path)
        tail = max(0, count - OPEN_CHECK_TOKENS)
        check_token_range(tokens[tail:], vocab_size, path, offset=tail)
    return Shard(path=path, tokens=tokens, has_header=bool(header))


def shard_pattern(split: str) -> re.Pattern[str]:
    # "train_000000.bin" and modded-nanogpt's "fineweb_train_000001.bin"
    return re.compile(rf"^(?:.*_)?{re.escape(split)}_\d+\.bin$")


def _prepare_command(directory: Path) -> str:
    """The command that prepares ``directory``: its preset when the folder is named after one."""
    preset = directory.name if directory.name in PRESETS else "shakespeare"
    return f"python -m data.prepare --preset {preset} --out {directory}"


def find_shards(directory: str | os.PathLike[str], split: str) -> tuple[list[Path], bool]:
    """The shard files of `split` in `directory`, sorted, and whether they carry a header.

    Headered shards are `[prefix_]{split}_NNNNNN.bin`; a plain nanoGPT file is `{split}.bin`.
    """
    directory = Path(directory)
    hint = f"Prepare it with `{_prepare_command(directory)}`" + (
        " (or --dataset / --files), or point at a directory of modded-nanogpt .bin shards or nanoGPT "
        "train.bin/val.bin."
    )
    if not directory.exists():
        raise FileNotFoundError(f"shard directory {directory} does not exist. {hint}")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory. {hint}")
    pattern = shard_pattern(split)
    headered = sorted(p for p in directory.iterdir() if p.is_file() and pattern.match(p.name))
    raw = directory / f"{split}.bin"
    if headered and raw.is_file():
        raise ShardError(f"{directory} has both {raw.name} and {split}_NNNNNN.bin shards; keep only one layout.")
    if headered:
        return headered, True
    if raw.is_file():
        return [raw], has_magic(raw)
    present = sorted(p.name for p in directory.glob("*.bin"))
    raise FileNotFoundError(
        f"no '{split}' shards in {directory} (looked for {split}_NNNNNN.bin and {split}.bin; "
        f".bin files present: {present or 'none'}). {hint}"
    )


def _temporary_name(path: Path) -> Path:
    # Hidden and not ending in .bin, so a half-written file never matches a shard pattern.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


class ShardWriter:
    """Streams tokens into one headered shard; the file appears under its name only on commit().

    Used as a context manager it commits on success and deletes the temporary file on error.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.num_tokens = 0
        self._tmp = _temporary_name(self.path)
        self._file = open(self._tmp, "wb")
        self._file.write(bytes(HEADER_BYTES))  # placeholder until the count is known

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        if tokens.dtype != TOKEN_DTYPE:
            if not np.issubdtype(tokens.dtype, np.integer):
                raise TypeError(f"tokens must be integers, got {tokens.dtype}")
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high > np.iinfo(TOKEN_DTYPE).max:
                raise ValueError(f"token ids must lie in [0, 65535] to be stored as uint16, got [{low}, {high}]")
            tokens = tokens.astype(TOKEN_DTYPE)
        if self.num_tokens + tokens.size > MAX_SHARD_TOKENS:
            raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens")
        self._file.write(np.ascontiguousarray(tokens).tobytes())
        self.num_tokens += int(tokens.size)

    def commit(self) -> Path:
        self._file.seek(0)
        self._file.write(encode_header(self.num_tokens).tobytes())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_shard(path: str | os.PathLike[str], tokens: np.ndarray) -> Path:
    """Write `tokens` as one headered shard, atomically."""
    with ShardWriter(path) as writer:
        writer.write(tokens)
    return writer.path


class SplitWriter:
    """Appends tokens to `{split}_000000.bin`, `{split}_000001.bin`, ... of `shard_size` tokens."""

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.done: list[Path] = []
        self.tokens = 0
        self._current: ShardWriter | None = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._current is None:
                self._current = ShardWriter(self.out_dir / f"{self.split}_{len(self.done):06d}.bin")
            room = self.shard_size - self._current.num_tokens
            self._current.write(tokens[:room])
            self.tokens += min(room, int(tokens.size))
            tokens = tokens[room:]
            if self._current.num_tokens == self.shard_size:
                self.done.append(self._current.commit())
                self._current = None

    def finish(self) -> list[Path]:
        if self._current is not None:
            self.done.append(self._current.commit())
            self._current = None
        return self.done

    def discard(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None
        for path in self.done:
            path.unlink(missing_ok=True)
        self.done = []
