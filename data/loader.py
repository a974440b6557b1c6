"""Memory-mapped token shards -> batches of (seq_len + 1)-token windows, deterministic from (seed, step).

Each shard is cut into windows of seq_len + 1 tokens starting every seq_len tokens, so the
input and target spans of different windows never overlap and every token is predicted once per
epoch. An epoch is a permutation of all windows (derived from (seed, epoch) only); step k takes
the k-th run of global_batch windows of that permutation. Nothing but the step needs saving to
resume, and each JAX process reads only its own rows of the global batch.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import cast

import numpy as np

from data.shards import Shard, check_token_range, find_shards, open_shard
from data.tokenizer import VOCAB_SIZE

_MASK64 = (1 << 64) - 1


class DataSizeError(ValueError):
    """The data is too small for the batch or the window asked of it."""


def data_directory(path: str) -> Path:
    """A data.path setting as a folder of token shards: "shakespeare" is the bundled corpus,
    prepared on first use; anything else is a folder path."""
    if path == "shakespeare":
        from data.shakespeare import ensure_shakespeare
        return ensure_shakespeare(progress=False)
    return Path(path)


def _mix64_int(x: int) -> int:
    """splitmix64's finalizer on a Python int (a bijection of 64-bit integers)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The same finalizer on a uint64 array (multiplication wraps modulo 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(num_windows) that depends only on (seed, epoch).

    Windows are ordered by a keyed 64-bit hash of their index. Unlike NumPy's random
    generators, whose streams may change between releases, this order is fixed forever, so a
    run resumed under another NumPy version sees the same batches.
    """
    key = _mix64_int(_mix64_int(seed) ^ _mix64_int(epoch + 0x9E3779B97F4A7C15))
    ids = np.arange(num_windows, dtype=np.uint64)
    ids ^= np.uint64(key)
    return np.argsort(_mix64(ids), kind="stable")


class TokenShards:
    """All shards of one split, memory-mapped and validated."""

    def __init__(self, shards: Sequence[Shard], vocab_size: int = VOCAB_SIZE, split: str = "") -> None:
        if not shards:
            raise ValueError("no shards given")
        self.shards = list(shards)
        self.vocab_size = vocab_size
        self.split = split
        self.lengths = np.array([s.num_tokens for s in self.shards], dtype=np.int64)

    @classmethod
    def open(
        cls, directory: str | os.PathLike[str], split: str = "train", *, vocab_size: int = VOCAB_SIZE
    ) -> TokenShards:
        """Open `split` in `directory`: headers and sizes are checked for every shard, token ids
        at each shard's ends now and inside every window when it is read."""
        paths, headered = find_shards(directory, split)
        shards = [open_shard(p, header=headered, vocab_size=vocab_size) for p in paths]
        return cls(shards, vocab_size=vocab_size, split=split)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.shards]

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, shard_index: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of one shard, range-checked against the vocabulary."""
        shard = self.shards[shard_index]
        if start < 0 or start + length > shard.num_tokens:
            raise IndexError(f"{shard.path}: [{start}, {start + length}) is outside its {shard.num_tokens} tokens")
        tokens = shard.tokens[start : start + length]
        check_token_range(tokens, self.vocab_size, shard.path, offset=start)
        return tokens


class _Windows:
    """Window w <-> (shard, start): windows of seq_len + 1 tokens every seq_len tokens per shard."""

    def __init__(self, data: TokenShards, seq_len: int) -> None:
        self.data = data
        self.seq_len = seq_len
        window = seq_len + 1
        longest = int(data.lengths.max())
        if window > longest:
            raise DataSizeError(
                f"seq_len {seq_len} needs windows of {window} tokens, but the longest '{data.split}' shard "
                f"holds only {longest} tokens ({data.shards[int(data.lengths.argmax())].path}). "
                "Use a shorter seq_len, or prepare the data with larger shards (--shard-size)."
            )
        per_shard = np.maximum(data.lengths - 1, 0) // seq_len
        short = [str(s.path) for s, n in zip(data.shards, per_shard, strict=True) if n == 0]
        if short:
            warnings.warn(
                f"{len(short)} '{data.split}' shard(s) hold fewer than seq_len + 1 = {window} tokens and are "
                f"skipped: {short[:3]}{' ...' if len(short) > 3 else ''}",
                stacklevel=3,
            )
        self.first = np.concatenate([[0], np.cumsum(per_shard)])  # first window id of each shard
        self.count = int(self.first[-1])

    def read(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int32)
        shard_of = np.searchsorted(self.first, ids, side="right") - 1
        starts = (ids - self.first[shard_of]) * self.seq_len
        for row, (s, start) in enumerate(zip(shard_of.tolist(), starts.tolist(), strict=True)):
            out[row] = self.data.read(s, start, self.seq_len + 1)
        return out


def _jax_process() -> tuple[int, int]:
    import jax  # only when the caller did not say which process this is

    return jax.process_index(), jax.process_count()


class TokenLoader:
    """Training batches by step and a fixed validation set, sliced for this process.

    `train_batch(step)` is the rows [process_index * local_batch, (process_index + 1) * local_batch)
    of the global batch for `step`, an int32 array (local_batch, seq_len + 1): inputs are
    `[:, :-1]`, targets `[:, 1:]`.
    """

    def __init__(
        self,
        train: TokenShards,
        val: TokenShards | None,
        *,
        seq_len: int,
        global_batch: int,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        val_global_batch: int | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if process_index is None or process_count is None:
            found_index, found_count = _jax_process()
            process_index = found_index if process_index is None else process_index
            process_count = found_count if process_count is None else process_count
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
        val_global_batch = global_batch if val_global_batch is None else val_global_batch
        for name, batch in (("global_batch", global_batch), ("val_global_batch", val_global_batch)):
            if batch < 1 or batch % process_count:
                raise ValueError(
                    f"{name} {batch} must be a positive multiple of the number of processes ({process_count}), "
                    "since each process reads an equal slice of it."
                )
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.val_global_batch = val_global_batch
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch = global_batch // process_count
        self.val_local_batch = val_global_batch // process_count

        self._train = _Windows(train, seq_len)
        if global_batch > self._train.count:
            raise DataSizeError(
                f"global_batch {global_batch} is larger than the data: the train split holds "
                f"{self._train.count} windows of {seq_len + 1} tokens ({train.num_tokens} tokens). "
                "Lower global_batch or seq_len, or prepare more data."
            )
        self._val = _Windows(val, seq_len) if val is not None else None
        self._perms: dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        seq_len: int,
        global_batch: int,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        val_global_batch: int | None = None,
        vocab_size: int = VOCAB_SIZE,
        train_split: str = "train",
        val_split: str | None = "val",
    ) -> TokenLoader:
        """Open `directory`'s train and val shards (val_split=None: no validation set)."""
        train = TokenShards.open(directory, train_split, vocab_size=vocab_size)
        val = TokenShards.open(directory, val_split, vocab_size=vocab_size) if val_split is not None else None
        return cls(
            train,
            val,
            seq_len=seq_len,
            global_batch=global_batch,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            val_global_batch=val_global_batch,
        )

    # --- training -------------------------------------------------------------------------

    @property
    def windows_per_epoch(self) -> int:
        return self._train.count

    @property
    def steps_per_epoch(self) -> int:
        # The last partial batch of an epoch is dropped so that no window repeats within it.
        return self._train.count // self.global_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._perm_lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = epoch_permutation(self._train.count, self.seed, epoch)
                # Keep this epoch and the one before (the prefetch thread may run ahead of the caller).
                self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
                self._perms[epoch] = perm
            return perm

    def train_window_ids(self, step: int) -> np.ndarray:
        """Window ids of the whole global batch at `step` (all processes), shape (global_batch,)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self._permutation(epoch)[start : start + self.global_batch]

    def train_batch(self, step: int) -> np.ndarray:
        """This process's rows of the global batch at `step`: int32 (local_batch, seq_len + 1)."""
        ids = self.train_window_ids(step)
        first = self.process_index * self.local_batch
        return self._train.read(ids[first : first + self.local_batch])

    def iter_from(self, start_step: int = 0, *, stop_step: int | None = None, prefetch: int = 2) -> BatchIterator:
        """(step, train_batch(step)) for step = start_step, start_step + 1, ... read ahead in a thread."""
        return BatchIterator(self.train_batch, start_step, stop_step=stop_step, prefetch=prefetch)

    # --- validation -----------------------------------------------------------------------

    @property
    def num_val_batches(self) -> int:
        """How many full validation batches the val split holds."""
        return 0 if self._val is None else self._val.count // self.val_global_batch

    def _val_too_small(self, requested: int) -> ValueError:
        assert self._val is not None
        return ValueError(
            f"{requested} validation batch(es) asked for, but the val split holds {self._val.count} windows of "
            f"{self.seq_len + 1} tokens: {self.num_val_batches} batch(es) of {self.val_global_batch}. "
            "Ask for fewer batches, lower val_global_batch or seq_len, or prepare more validation data."
        )

    def val_batch(self, index: int) -> np.ndarray:
        """Validation batch `index`: the val split's windows in file order, never shuffled."""
        if self._val is None:
            raise ValueError("this loader was opened without a validation split (val_split=None)")
        if not 0 <= index < self.num_val_batches:
            raise self._val_too_small(index + 1)
        first = index * self.val_global_batch + self.process_index * self.val_local_batch
        return self._val.read(np.arange(first, first + self.val_local_batch, dtype=np.int64))

    def val_batches(self, n_batches: int | None = None) -> Iterator[np.ndarray]:
        """The first `n_batches` validation batches (all full ones if None), the same on every call.

        Checked now, read lazily as the iterator advances.
        """
        if self._val is None:
            raise ValueError("this loader was opened without a validation split (val_split=None)")
        n = self.num_val_batches if n_batches is None else n_batches
        if n < 0 or n > self.num_val_batches or (n == 0 and n_batches is None):
            raise self._val_too_small(max(n, 1))
        return (self.val_batch(i) for i in range(n))


class _End:
    pass


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _produce(
    make_batch: Callable[[int], np.ndarray],
    start: int,
    stop_step: int | None,
    out: queue.Queue[object],
    stop: threading.Event,
) -> None:
    # Runs in the prefetch thread; holds no reference to the iterator so that it can be collected.
    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    step = start
    while stop_step is None or step < stop_step:
        if stop.is_set():
            return
        try:
            item: object = (step, make_batch(step))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))
            return
        if not put(item):
            return
        step += 1
    put(_End())


class BatchIterator:
    """Iterator of (step, batch) filled by a background thread; `close()` (or `with`) stops it."""

    def __init__(
        self,
        make_batch: Callable[[int], np.ndarray],
        start_step: int,
        *,
        stop_step: int | None = None,
        prefetch: int = 2,
    ) -> None:
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.next_step = start_step
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=_produce,
            args=(make_batch, start_step, stop_step, self._queue, self._stop),
            name="batch-prefetch",
            daemon=True,
        )
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[int, np.ndarray]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        step, batch = cast(tuple[int, np.ndarray], item)
        self.next_step = step + 1
        return step, batch

    def close(self) -> None:
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5.0)

    @property
    def closed(self) -> bool:
        return self._done

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
