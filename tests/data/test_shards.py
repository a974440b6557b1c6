from pathlib import Path

import numpy as np
import pytest

from data import shards
from data.loader import TokenShards


def _modded_nanogpt_file(
    path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1, count: int | None = None
) -> None:
    """A shard laid out by hand as modded-nanogpt writes it, independent of data.shards."""
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def test_header_round_trip(tmp_path: Path) -> None:
    tokens = np.arange(1000, dtype=np.int64) * 37 % 50257
    path = shards.write_shard(tmp_path / "train_000000.bin", tokens)
    assert shards.read_header(path) == (20240520, 1, 1000)
    assert path.stat().st_size == 1024 + 2 * 1000
    shard = shards.open_shard(path, vocab_size=50257)
    assert shard.has_header and shard.num_tokens == 1000
    np.testing.assert_array_equal(shard.tokens, tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["train_000000.bin"]  # no temporary left behind


def test_reads_a_modded_nanogpt_shard(tmp_path: Path) -> None:
    tokens = np.array([50256, 464, 2068, 7586, 21831, 50256, 15496, 995], dtype=np.uint16)
    _modded_nanogpt_file(tmp_path / "fineweb_train_000001.bin", tokens)
    _modded_nanogpt_file(tmp_path / "fineweb_val_000000.bin", tokens[:4])
    paths, headered = shards.find_shards(tmp_path, "train")
    assert [p.name for p in paths] == ["fineweb_train_000001.bin"] and headered
    data = TokenShards.open(tmp_path, "train")
    np.testing.assert_array_equal(data.shards[0].tokens, tokens)
    assert TokenShards.open(tmp_path, "val").num_tokens == 4


def test_reads_a_plain_nanogpt_file(tmp_path: Path) -> None:
    tokens = np.arange(500, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    paths, headered = shards.find_shards(tmp_path, "train")
    assert paths == [tmp_path / "train.bin"] and not headered
    shard = shards.open_shard(paths[0], header=headered)
    np.testing.assert_array_equal(shard.tokens, tokens)


def test_wrong_magic_is_refused(tmp_path: Path) -> None:
    _modded_nanogpt_file(tmp_path / "train_000000.bin", np.arange(10), magic=20240521)
    with pytest.raises(shards.ShardError, match=r"wrong magic number 20240521"):
        TokenShards.open(tmp_path, "train")


def test_truncated_shard_is_refused(tmp_path: Path) -> None:
    path = shards.write_shard(tmp_path / "train_000000.bin", np.arange(100))
    with open(path, "r+b") as f:
        f.truncate(1024 + 150)
    with pytest.raises(shards.ShardError, match=r"says 100 tokens .* has 1174 bytes: it is truncated"):
        shards.open_shard(path, header=True)
    with open(path, "r+b") as f:
        f.truncate(600)
    with pytest.raises(shards.ShardError, match=r"shorter than the 1024-byte shard header"):
        shards.open_shard(path, header=True)


def test_size_disagreeing_with_header_is_refused(tmp_path: Path) -> None:
    _modded_nanogpt_file(tmp_path / "train_000000.bin", np.arange(100), count=120)
    with pytest.raises(shards.ShardError, match=r"header says 120 tokens"):
        TokenShards.open(tmp_path, "train")
    with open(tmp_path / "val_000000.bin", "wb") as f:
        f.write(shards.encode_header(10).tobytes() + bytes(2 * 10 + 1))
    with pytest.raises(shards.ShardError, match=r"header says 10 tokens"):
        TokenShards.open(tmp_path, "val")


def test_unknown_version_and_empty_shards_are_refused(tmp_path: Path) -> None:
    _modded_nanogpt_file(tmp_path / "a_train_000000.bin", np.arange(10), version=7)
    with pytest.raises(shards.ShardError, match=r"version 7"):
        shards.open_shard(tmp_path / "a_train_000000.bin")
    shards.write_shard(tmp_path / "empty_000000.bin", np.zeros(0, dtype=np.uint16))
    with pytest.raises(shards.ShardError, match=r"holds no tokens"):
        shards.open_shard(tmp_path / "empty_000000.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(shards.ShardError, match=r"not a whole number of uint16 tokens"):
        shards.open_shard(tmp_path / "odd.bin", header=False)


def test_token_outside_vocabulary_is_refused(tmp_path: Path) -> None:
    tokens = np.zeros(200_000, dtype=np.uint16)
    tokens[5] = 50257
    path = shards.write_shard(tmp_path / "train_000000.bin", tokens)
    with pytest.raises(shards.ShardError, match=r"token id 50257 at position 5 is outside the vocabulary"):
        shards.open_shard(path, vocab_size=50257)
    # Deep inside a large shard it is not scanned on open, but caught when a window covers it.
    tokens[5], tokens[100_000] = 0, 60000
    shards.write_shard(path, tokens)
    data = TokenShards.open(tmp_path, "train")
    data.read(0, 0, 1000)
    with pytest.raises(shards.ShardError, match=r"token id 60000 at position 100000"):
        data.read(0, 99_990, 20)


def test_failed_write_leaves_no_shard(tmp_path: Path) -> None:
    target = tmp_path / "train_000000.bin"
    with pytest.raises(RuntimeError, match=r"interrupted"):
        with shards.ShardWriter(target) as writer:
            writer.write(np.arange(100))
            assert not target.exists()  # only a hidden temporary name exists while writing
            assert all(p.name.startswith(".") and not p.name.endswith(".bin") for p in tmp_path.iterdir())
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    for bad in (np.array([65536]), np.array([-1]), np.array([0.5])):
        with pytest.raises((ValueError, TypeError)):
            shards.write_shard(target, bad)
    assert list(tmp_path.iterdir()) == []


def test_find_shards_explains_missing_data(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*python -m data.prepare"):
        shards.find_shards(tmp_path / "nowhere", "train")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"no 'train' shards"):
        shards.find_shards(tmp_path, "train")
    shards.write_shard(tmp_path / "train_000000.bin", np.arange(10))
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(shards.ShardError, match=r"keep only one layout"):
        shards.find_shards(tmp_path, "train")


def test_shards_sorted_and_split_names_not_confused(tmp_path: Path) -> None:
    for name in ("train_000002.bin", "train_000000.bin", "x_train_000001.bin", "val_000000.bin", "retrain_000000.bin"):
        shards.write_shard(tmp_path / name, np.arange(10))
    paths, _ = shards.find_shards(tmp_path, "train")
    assert [p.name for p in paths] == ["train_000000.bin", "train_000002.bin", "x_train_000001.bin"]


def test_a_missing_corpus_folder_names_the_command_that_prepares_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--preset fineweb-edu --out .*fineweb-edu`"):
        shards.find_shards(tmp_path / "fineweb-edu", "train")
    with pytest.raises(FileNotFoundError, match=r"--preset shakespeare --out .*my_corpus`"):  # no preset of that name
        shards.find_shards(tmp_path / "my_corpus", "train")
