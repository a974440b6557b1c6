"""GPT-2 tokenizing of document chunks in worker processes, results in input order."""

from __future__ import annotations

import collections
import multiprocessing
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from data import shards
from data.tokenizer import EOT_TOKEN, gpt2_encoding

CHUNK_CHARS = 1 << 20  # text handed to a worker at a time: large enough to amortize IPC
SPLITS = ("train", "val")


def _init_worker() -> None:
    gpt2_encoding()  # built once per worker (inherited for free when the pool forks)


def _encode_chunk(chunk: tuple[list[str], list[bool]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize documents -> (train tokens, val tokens, tokens per document, is-val per document)."""
    texts, is_val = chunk
    encoded = gpt2_encoding().encode_ordinary_batch(texts, num_threads=1)
    out: dict[bool, list[int]] = {False: [], True: []}
    for ids, val in zip(encoded, is_val, strict=True):
        tokens = out[val]
        tokens.append(EOT_TOKEN)
        tokens.extend(ids)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    return (
        np.array(out[False], dtype=shards.TOKEN_DTYPE),
        np.array(out[True], dtype=shards.TOKEN_DTYPE),
        lengths,
        np.array(is_val, dtype=bool),
    )


def chunk_documents(
    documents: Iterable[tuple[str, str]], counts: collections.Counter[str]
) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    is_val: list[bool] = []
    size = 0
    for split, text in documents:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not text:
            counts["empty"] += 1
            continue
        texts.append(text)
        is_val.append(split == "val")
        size += len(text)
        if size >= CHUNK_CHARS:
            yield texts, is_val
            texts, is_val, size = [], [], 0
    if texts:
        yield texts, is_val


def _pool_context() -> multiprocessing.context.BaseContext:
    """The platform's default start method, except never fork a process running other threads
    (JAX's runtime, for one, is multithreaded): a forked copy could deadlock on their locks."""
    context = multiprocessing.get_context()
    if context.get_start_method() == "fork" and (threading.active_count() > 1 or "jax" in sys.modules):
        return multiprocessing.get_context("spawn")
    return context


class Encoder:
    """Tokenizes chunks in `workers` processes (in this one if workers == 1), results in input order.

    At most 2 chunks per worker are in flight: the input may be a stream far larger than memory,
    which Pool.imap would read ahead without limit. Entered before the progress bar starts its
    monitor thread, so that a plain command-line run can still fork.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            self._pool = _pool_context().Pool(self.workers, initializer=_init_worker)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def __call__(self, chunks: Iterator[tuple[list[str], list[bool]]]) -> Iterator[tuple[np.ndarray, ...]]:
        if self._pool is None:
            yield from map(_encode_chunk, chunks)
            return
        pending: collections.deque[Any] = collections.deque()
        for chunk in chunks:
            pending.append(self._pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
