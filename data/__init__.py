"""Data pipeline: GPT-2 tokenizer (offline), token shards, corpus preparation, batch loader."""

from data.cache import default_cache_dir
from data.loader import BatchIterator, TokenLoader, TokenShards
from data.tokenizer import EOT_TOKEN, VOCAB_SIZE, get_tokenizer, gpt2_encoding

__all__ = [
    "EOT_TOKEN",
    "VOCAB_SIZE",
    "BatchIterator",
    "TokenLoader",
    "TokenShards",
    "default_cache_dir",
    "ensure_shakespeare",
    "get_tokenizer",
    "gpt2_encoding",
]


def __getattr__(name: str) -> object:
    # Imported on first use: data.shakespeare imports data.prepare, which must not be loaded
    # before `python -m data.prepare` runs it as __main__.
    if name == "ensure_shakespeare":
        from data.shakespeare import ensure_shakespeare

        return ensure_shakespeare
    raise AttributeError(f"module 'data' has no attribute {name!r}")
