"""Data pipeline: GPT-2 tokenizer (offline), token shards, corpus preparation, batch loader.

- tokenizer.py      GPT-2's BPE from local, checksummed files
- shards.py         the headered uint16 shard format, its readers and writers
- sources.py        documents from Hugging Face datasets or local files; the train/val rule
- encode.py         tokenizing document chunks in worker processes
- prepare_corpus.py sources -> encode -> shards + meta.json
- prepare.py        its command line, ``python -m data.prepare``
- shakespeare.py    the bundled default corpus, prepared once into the cache (cache.py)
- loader.py         deterministic, resumable, per-process batches
- files.py          atomic file writes every layer uses (checkpoint directories rotated, damaged ones moved aside)
"""

from data.cache import default_cache_dir
from data.loader import BatchIterator, TokenLoader, TokenShards
from data.shakespeare import ensure_shakespeare
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

