"""Tokenize documents with GPT-2's BPE into train/val token shards: the library behind
``python -m data.prepare`` (data/prepare.py, the command line).

Every document is prefixed with <|endoftext|>. Output: DIR/train_000000.bin ..., DIR/val_000000.bin
... (modded-nanogpt's headered uint16 layout, see data/shards.py) and DIR/meta.json, written last.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data import shards
from data.encode import SPLITS, Encoder, chunk_documents
from data.sources import assign_splits, file_documents, hf_documents
from data.tokenizer import EOT_TOKEN, VOCAB_SIZE, gpt2_encoding
from recipes.files import write_json

DEFAULT_SHARD_SIZE = 100_000_000  # tokens per shard (200 MB), as in modded-nanogpt's FineWeb shards
DEFAULT_VAL_FRACTION = 0.01


class EmptyDatasetError(ValueError):
    """The input produced no tokens (or none for the train split)."""


def _claim_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create out_dir; refuse to mix with token data already there unless it is ours to replace."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = re.compile(r"^(?:train|val)_\d{6}\.bin$")
    found = [
        p
        for p in out_dir.iterdir()
        if p.name == "meta.json"
        or p.name in {f"{s}.bin" for s in SPLITS}
        or any(shards.shard_pattern(s).match(p.name) for s in SPLITS)
    ]
    if not found:
        return
    foreign = [p for p in found if p.name != "meta.json" and not ours.match(p.name)]
    if not overwrite or foreign:
        listed = ", ".join(sorted(p.name for p in found)[:5]) + (", ..." if len(found) > 5 else "")
        advice = (
            "Choose another --out: --overwrite only replaces train_NNNNNN.bin, val_NNNNNN.bin and meta.json."
            if foreign
            else "Pass --overwrite to replace it, or choose another --out."
        )
        raise FileExistsError(f"{out_dir} already holds token data ({listed}). {advice}")
    (out_dir / "meta.json").unlink(missing_ok=True)  # first, so the directory never looks complete
    for path in found:
        path.unlink(missing_ok=True)


@dataclass
class PrepareResult:
    out_dir: Path
    tokens: dict[str, int]
    documents: dict[str, int]
    shards: dict[str, list[str]]
    seconds: float
    workers: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def tokens_per_second(self) -> float:
        return self.total_tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        parts = [
            f"{s}: {self.tokens[s]:,} tokens, {self.documents[s]:,} documents, {len(self.shards[s])} shard(s)"
            for s in SPLITS
        ]
        return (
            f"wrote {self.out_dir} ({'; '.join(parts)})\n"
            f"throughput: {self.tokens_per_second:,.0f} tokens/s with {self.workers} worker(s) "
            f"({self.total_tokens:,} tokens in {self.seconds:.2f} s)"
        )


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def prepare_documents(
    documents: Iterable[tuple[str, str]],
    out_dir: str | os.PathLike[str],
    *,
    source: Mapping[str, Any],
    split_rule: Mapping[str, Any],
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    max_tokens: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize (split, text) pairs into `out_dir` and write meta.json last.

    Output is identical for any number of workers. Stops after the document that reaches
    `max_tokens` (train + val). On any error, the shards written so far are removed.
    """
    if shard_size < 1 or shard_size > shards.MAX_SHARD_TOKENS:
        raise ValueError(f"shard_size must be in [1, {shards.MAX_SHARD_TOKENS}], got {shard_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    _claim_out_dir(out, overwrite)
    gpt2_encoding()  # fail early if the tokenizer is missing; forked workers inherit it

    writers = {s: shards.SplitWriter(out, s, shard_size) for s in SPLITS}
    docs: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()
    try:
        with (
            Encoder(workers) as encode,
            tqdm(
                total=max_tokens,
                unit="tok",
                unit_scale=True,
                desc=f"tokenizing ({workers} worker{'s' if workers > 1 else ''})",
                disable=not progress,
            ) as bar,
        ):
            for train, val, lengths, is_val in encode(chunk_documents(documents, docs)):
                total = writers["train"].tokens + writers["val"].tokens
                if max_tokens is not None and total + int(lengths.sum()) >= max_tokens:
                    keep = int(np.searchsorted(np.cumsum(lengths), max_tokens - total)) + 1
                    train = train[: int(lengths[:keep][~is_val[:keep]].sum())]
                    val = val[: int(lengths[:keep][is_val[:keep]].sum())]
                    lengths, is_val = lengths[:keep], is_val[:keep]
                writers["train"].write(train)
                writers["val"].write(val)
                docs["val"] += int(is_val.sum())
                docs["train"] += int(is_val.size - is_val.sum())
                bar.update(int(lengths.sum()))
                if max_tokens is not None and writers["train"].tokens + writers["val"].tokens >= max_tokens:
                    break
        written = {s: writers[s].finish() for s in SPLITS}
        seconds = time.perf_counter() - start
        tokens = {s: writers[s].tokens for s in SPLITS}
        if tokens["train"] == 0:
            if tokens["val"] == 0:
                raise EmptyDatasetError(
                    f"the input produced no tokens: {docs['empty']} empty document(s) and none with text "
                    f"(source: {dict(source)}). Check the files or dataset name, its split, and --text-field."
                )
            raise EmptyDatasetError(
                f"the train split is empty: all {docs['val']} document(s) went to validation. Lower "
                "--val-fraction (0 for no val split), give more documents, or for a single text file use "
                "--text-unit paragraph."
            )
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise

    meta = {
        "format": {
            "layout": "modded-nanogpt",
            "magic": shards.MAGIC,
            "version": shards.VERSION,
            "header_bytes": shards.HEADER_BYTES,
            "dtype": "uint16",
        },
        "tokenizer": {"name": "gpt2", "vocab_size": VOCAB_SIZE, "eot_token": EOT_TOKEN, "eot": "before each document"},
        "source": dict(source),
        "split": dict(split_rule),
        "shard_size": shard_size,
        "max_tokens": max_tokens,
        "empty_documents_skipped": docs["empty"],
        "splits": {
            s: {"tokens": tokens[s], "documents": docs[s], "shards": [p.name for p in written[s]]} for s in SPLITS
        },
    }
    write_json(out / "meta.json", meta)
    return PrepareResult(
        out_dir=out,
        tokens=tokens,
        documents={s: docs[s] for s in SPLITS},
        shards={s: [p.name for p in written[s]] for s in SPLITS},
        seconds=seconds,
        workers=workers,
        meta=meta,
    )


def _fraction_rule(val_fraction: float) -> dict[str, Any]:
    return {"val_fraction": val_fraction, "rule": "document i is val iff frac(i * golden ratio) < val_fraction"}


def prepare_hf(
    dataset: str,
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    **options: Any,
) -> PrepareResult:
    """Stream a Hugging Face dataset into shards (options: see prepare_documents)."""
    texts = hf_documents(dataset, name, split=split, text_field=text_field)
    source = {"kind": "huggingface", "dataset": dataset, "name": name, "split": split, "text_field": text_field}
    return prepare_documents(
        assign_splits(texts, val_fraction), out_dir, source=source, split_rule=_fraction_rule(val_fraction), **options
    )


def prepare_files(
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    text_field: str = "text",
    text_unit: str = "document",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    **options: Any,
) -> PrepareResult:
    """Tokenize local .txt/.md/.json/.jsonl/.parquet/.csv files into shards (options: see prepare_documents)."""
    texts = file_documents(paths, text_field=text_field, text_unit=text_unit)
    source = {"kind": "files", "files": [str(p) for p in paths], "text_field": text_field, "text_unit": text_unit}
    return prepare_documents(
        assign_splits(texts, val_fraction), out_dir, source=source, split_rule=_fraction_rule(val_fraction), **options
    )
