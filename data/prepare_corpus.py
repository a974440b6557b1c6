"""Tokenize documents with GPT-2's BPE into train/val token shards: the library behind
``python -m data.prepare`` (data/prepare.py, the command line).

Every document is prefixed with <|endoftext|>. Output: DIR/train_000000.bin ..., DIR/val_000000.bin
... (modded-nanogpt's headered uint16 layout, see data/shards.py) and DIR/meta.json, written last.
"""

from __future__ import annotations

import bz2
import codecs
import collections
import gzip
import lzma
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data import shards
from data.encode import SPLITS, Encoder, chunk_documents
from data.files import write_json
from data.presets import DEFAULT_VAL_FRACTION
from data.sources import FILE_BUILDERS, assign_splits, file_documents, hf_documents
from data.tokenizer import EOT_TOKEN, VOCAB_SIZE, gpt2_encoding

DEFAULT_SHARD_SIZE = 100_000_000  # tokens per shard (200 MB), as in modded-nanogpt's FineWeb shards
SNIFF_BYTES = 8192  # how much of each input file is checked for being what its name says, up front
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # sources.COMPRESSION_SUFFIXES


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
    `max_tokens` (train + val). On any error, the shards written so far are removed, and so are
    `out_dir` and its parents if this call created them.
    """
    if shard_size < 1 or shard_size > shards.MAX_SHARD_TOKENS:
        raise ValueError(f"shard_size must be in [1, {shards.MAX_SHARD_TOKENS}], got {shard_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    created = _missing_directories(out)
    try:
        _claim_out_dir(out, overwrite)
        gpt2_encoding()  # fail early if the tokenizer is missing; forked workers inherit it
        return _prepare_into(documents, out, source=source, split_rule=split_rule, shard_size=shard_size,
                             workers=workers, max_tokens=max_tokens, progress=progress)
    except BaseException:
        for directory in created:  # a failed prepare leaves no directory it created (they are empty now)
            try:
                directory.rmdir()
            except OSError:  # something else wrote there meanwhile: left as it is
                break
        raise


def _missing_directories(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _prepare_into(
    documents: Iterable[tuple[str, str]],
    out: Path,
    *,
    source: Mapping[str, Any],
    split_rule: Mapping[str, Any],
    shard_size: int,
    workers: int,
    max_tokens: int | None,
    progress: bool,
) -> PrepareResult:
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
    try:
        write_json(out / "meta.json", meta)
    except BaseException:  # shards without meta.json are an incomplete corpus: none are left
        for writer in writers.values():
            writer.discard()
        raise
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
    """Tokenize local .txt/.md/.json/.jsonl/.parquet/.csv files into shards (options: see prepare_documents).
    A file that is not what its name says (a binary file, text not in UTF-8) is refused naming it."""
    texts = file_documents(paths, text_field=text_field, text_unit=text_unit)
    for path in paths:  # before --out is touched; the rest of each file is checked as it is read
        _check_input_head(Path(path))
    texts = _naming_undecodable_files(texts, [Path(p) for p in paths])
    source = {"kind": "files", "files": [str(p) for p in paths], "text_field": text_field, "text_unit": text_unit}
    return prepare_documents(
        assign_splits(texts, val_fraction), out_dir, source=source, split_rule=_fraction_rule(val_fraction), **options
    )


def _input_kind(path: Path) -> tuple[str, Any]:
    """(format suffix, opener) of an input file: the suffix before any compression suffix."""
    suffixes = [x.lower() for x in path.suffixes]
    opener = _OPENERS.get(suffixes[-1]) if suffixes else None
    return (suffixes[-2] if opener else suffixes[-1]), (opener or open)


def _not_text(path: Path, offset: int, what: str) -> ValueError:
    where = " of its decompressed content" if _input_kind(path)[1] is not open else ""
    return ValueError(
        f"{path} is not UTF-8 text ({what} at offset {offset:,}{where}): it looks like a binary file, or "
        "text in another encoding. Leave it out of --files, or convert it to UTF-8 text first "
        "(e.g. iconv -f latin1 -t utf-8)"
    )


def _check_input_head(path: Path) -> None:
    """Refuses, naming it, an input whose first SNIFF_BYTES are not what its suffix says."""
    kind, opener = _input_kind(path)
    try:
        with opener(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, lzma.LZMAError) as error:  # what gzip, bz2 and lzma raise for other content
        if opener is open or isinstance(error, PermissionError):
            raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}): fix its permissions, "
                             "or leave it out of --files") from None
        raise ValueError(
            f"{path} does not decompress as its name says ({type(error).__name__}: {error}): rename it to "
            "what it holds, or leave it out of --files"
        ) from None
    if FILE_BUILDERS.get(kind) == "parquet":
        if not head.startswith(b"PAR1"):
            raise ValueError(f"{path} is not a Parquet file (no PAR1 magic at its start): rename it to what it "
                             "holds, or leave it out of --files")
        return
    if b"\0" in head:
        raise _not_text(path, head.index(b"\0"), "a NUL byte")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as error:
        raise _not_text(path, error.start, f"byte 0x{head[error.start]:02x}") from None


def _first_undecodable(path: Path) -> tuple[int, int] | None:
    """(offset, byte) of the first byte of ``path`` (decompressed) that is not UTF-8, or None."""
    kind, opener = _input_kind(path)
    if FILE_BUILDERS.get(kind) == "parquet":
        return None
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                # the error's start counts from the bytes the decoder held back, at most 3
                held = len(error.object) - len(chunk)
                return offset + error.start - held, error.object[error.start]
            offset += len(chunk)
    return None


def _naming_undecodable_files(texts: Iterator[str], paths: list[Path]) -> Iterator[str]:
    """``texts``, with a decoding failure past the checked head turned into an error naming the file
    (the reader's own names no file)."""
    try:
        yield from texts
    except UnicodeDecodeError:
        for path in paths:  # only after a failure: each file is read once more
            found = _first_undecodable(path)
            if found is not None:
                raise _not_text(path, found[0], f"byte 0x{found[1]:02x}") from None
        raise
