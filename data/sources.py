"""Where documents come from: Hugging Face datasets (streamed) and local files, and the
deterministic train/val assignment of a document stream."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text"}
FILE_BUILDERS = {
    **TEXT_SUFFIXES,
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")  # decompressed on the fly by datasets


class DatasetUnavailableError(RuntimeError):
    """A Hugging Face dataset could not be opened (typically: no network and not cached)."""


def is_val_document(index: int, val_fraction: float) -> bool:
    """Whether document `index` of a stream belongs to the validation split.

    A Weyl sequence with the golden-ratio step spreads val documents evenly through the stream
    (exactly val_fraction in the long run) without knowing its length; document 0 is always val,
    so any stream with a positive fraction has a non-empty val split.
    """
    return ((index * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) < val_fraction * 2.0**64


def assign_splits(texts: Iterable[str], val_fraction: float) -> Iterator[tuple[str, str]]:
    """(split, text) for each text, by `is_val_document` on its position in the stream."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for index, text in enumerate(texts):
        yield ("val" if is_val_document(index, val_fraction) else "train"), text


def _hf_unavailable(description: str, exc: BaseException) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"could not open {description}: {type(exc).__name__}: {exc}\n"
        "Streaming a Hugging Face dataset needs network access to huggingface.co, or the dataset "
        "already in the local Hugging Face cache (HF_HOME). Offline, prepare local files instead:\n"
        "  python -m data.prepare --files part1.jsonl part2.parquet --text-field text --out DIR\n"
        "or use the bundled corpus: python -m data.prepare --preset shakespeare --out DIR"
    )


def _rows_with_text(rows: Iterator[Mapping[str, Any]], text_field: str, where: str) -> Iterator[str]:
    for row in rows:
        if text_field not in row:
            raise ValueError(
                f"{where}: rows have no field {text_field!r} (fields: {sorted(row)}). Pass --text-field NAME."
            )
        text = row[text_field]
        yield text if isinstance(text, str) else ""


def hf_documents(
    dataset: str, name: str | None = None, *, split: str = "train", text_field: str = "text"
) -> Iterator[str]:
    """Texts of a Hugging Face dataset, streamed. Opens it now, so an unreachable dataset fails
    here with DatasetUnavailableError rather than midway."""
    import datasets  # slow to import; only needed here

    description = f"Hugging Face dataset {dataset!r} (name={name!r}, split={split!r})"
    try:
        stream = datasets.load_dataset(dataset, name=name, split=split, streaming=True)
        rows = iter(stream)
        first = next(rows, None)
    except Exception as exc:  # the hub client raises many types (ConnectionError, HfHubHTTPError, ...)
        raise _hf_unavailable(description, exc) from exc
    if first is None:
        return iter(())
    return _rows_with_text(itertools.chain([first], rows), text_field, description)


def _builder_for(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    builder = FILE_BUILDERS.get(suffixes[-1]) if suffixes else None
    if builder is None:
        raise ValueError(f"{path}: unsupported file type; supported: {', '.join(sorted(FILE_BUILDERS))}")
    return builder


def file_documents(
    paths: Sequence[str | os.PathLike[str]], *, text_field: str = "text", text_unit: str = "document"
) -> Iterator[str]:
    """Texts of local files, in the order given, read through `datasets` (streaming, no cache).

    .txt/.md files give one document per file (text_unit="document"), per blank-line separated
    paragraph ("paragraph") or per line ("line"); .json/.jsonl/.parquet/.csv give one per row,
    from the column `text_field`.
    """
    if text_unit not in ("document", "paragraph", "line"):
        raise ValueError(f"text_unit must be document, paragraph or line, got {text_unit!r}")
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("no input files given")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    groups = [(b, list(g)) for b, g in itertools.groupby(files, key=_builder_for)]  # validates suffixes now
    return _read_file_groups(groups, text_field, text_unit)


def _read_file_groups(groups: list[tuple[str, list[Path]]], text_field: str, text_unit: str) -> Iterator[str]:
    import datasets

    # Streaming local files caches nothing, but datasets still leaves lock files in its cache
    # directory; keep them out of the user's Hugging Face cache.
    with tempfile.TemporaryDirectory(prefix="datasets-scratch-") as scratch:
        for builder, group in groups:
            options: dict[str, Any] = {"sample_by": text_unit} if builder == "text" else {}
            stream = datasets.load_dataset(
                builder, data_files=[str(p) for p in group], split="train", streaming=True, cache_dir=scratch, **options
            )
            field_name = "text" if builder == "text" else text_field
            yield from _rows_with_text(iter(stream), field_name, ", ".join(str(p) for p in group))
