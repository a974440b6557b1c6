"""Where cached files live. The only place in data/ that reads environment variables."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

APP_NAME = "celo2-gpt"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/celo2-gpt`, else `~/.cache/celo2-gpt` (prepared corpora go here)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / APP_NAME


def jax_cache_dir() -> Path:
    """`<default_cache_dir()>/jax`: the default of the scripts' --compilation-cache, JAX's persistent
    compilation cache, kept out of the directory a script is run from."""
    return default_cache_dir() / "jax"


def tiktoken_cache_dir() -> Path | None:
    """The directory tiktoken caches downloads in, resolved by tiktoken's own rules (tiktoken/load.py).

    None when the user disabled tiktoken's cache (an empty TIKTOKEN_CACHE_DIR).
    """
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            value = os.environ[var]
            return Path(value) if value else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"
