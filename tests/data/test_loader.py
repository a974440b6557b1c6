import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from data import shards
from data.loader import BatchIterator, TokenLoader, TokenShards, epoch_permutation

SEQ = 16
TRAIN_LENGTHS = (1000, 1537, 700)  # 62 + 96 + 43 = 201 windows of 17 tokens, every 16 tokens
VAL_LENGTH = 600
PINNED_PERMUTATION = [6, 1, 5, 0, 9, 4, 2, 7, 8, 3]  # epoch_permutation(10, seed=0, epoch=0)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Train shards whose token at global position i is i % 50000, so a window tells where it came from."""
    start = 0
    for index, length in enumerate(TRAIN_LENGTHS):
        shards.write_shard(tmp_path / f"train_{index:06d}.bin", (np.arange(length) + start) % 50000)
        start += length
    shards.write_shard(tmp_path / "val_000000.bin", 40000 + np.arange(VAL_LENGTH))
    return tmp_path


def _loader(directory: Path, **overrides: object) -> TokenLoader:
    options: dict[str, object] = dict(seq_len=SEQ, global_batch=8, seed=3, process_index=0, process_count=1)
    options.update(overrides)
    return TokenLoader.open(directory, **options)  # type: ignore[arg-type]


def test_batches_are_contiguous_windows(data_dir: Path) -> None:
    loader = _loader(data_dir)
    assert loader.windows_per_epoch == sum((n - 1) // SEQ for n in TRAIN_LENGTHS) == 201
    assert loader.steps_per_epoch == 201 // 8
    batch = loader.train_batch(0)
    assert batch.shape == (8, SEQ + 1) and batch.dtype == np.int32
    np.testing.assert_array_equal(np.diff(batch, axis=1), 1)  # consecutive tokens of one shard


def test_same_batches_on_every_run_and_seed_matters(data_dir: Path) -> None:
    a, b = _loader(data_dir), _loader(data_dir)
    for step in (0, 1, 7, 24, 25, 60):
        np.testing.assert_array_equal(a.train_batch(step), b.train_batch(step))
    other = _loader(data_dir, seed=4)
    assert not np.array_equal(a.train_batch(0), other.train_batch(0))


def test_no_window_repeats_within_an_epoch(data_dir: Path) -> None:
    loader = _loader(data_dir)
    steps = loader.steps_per_epoch
    epoch0 = np.concatenate([loader.train_window_ids(s) for s in range(steps)])
    assert len(np.unique(epoch0)) == len(epoch0) == steps * 8
    starts = np.concatenate([loader.train_batch(s)[:, 0] for s in range(steps)])
    assert len(np.unique(starts)) == len(starts)  # distinct data, not only distinct ids
    epoch1 = np.concatenate([loader.train_window_ids(s) for s in range(steps, 2 * steps)])
    assert len(np.unique(epoch1)) == len(epoch1)
    assert not np.array_equal(epoch0, epoch1)  # a new order each epoch


def test_epoch_permutation_is_fixed() -> None:
    perm = epoch_permutation(10, seed=0, epoch=0)
    assert sorted(perm.tolist()) == list(range(10))
    # Pinned: resuming a run must see the same order, whatever the NumPy version.
    assert perm.tolist() == epoch_permutation(10, seed=0, epoch=0).tolist() == PINNED_PERMUTATION
    assert epoch_permutation(10, seed=0, epoch=1).tolist() != PINNED_PERMUTATION


def test_resume_from_step_k_matches(data_dir: Path) -> None:
    reference = _loader(data_dir)
    resumed = _loader(data_dir)  # a fresh process: nothing but the step is carried over
    with resumed.iter_from(30, stop_step=36, prefetch=2) as batches:
        seen = []
        for step, batch in batches:
            np.testing.assert_array_equal(batch, reference.train_batch(step))
            seen.append(step)
            assert batches.next_step == step + 1
    assert seen == list(range(30, 36))


def test_process_slices_tile_the_global_batch(data_dir: Path) -> None:
    whole = _loader(data_dir, global_batch=12, val_global_batch=4)
    for count in (2, 4):
        parts = [
            _loader(data_dir, global_batch=12, val_global_batch=4, process_index=i, process_count=count)
            for i in range(count)
        ]
        assert all(p.local_batch == 12 // count for p in parts)
        for step in (0, 5, 16):
            np.testing.assert_array_equal(np.concatenate([p.train_batch(step) for p in parts]), whole.train_batch(step))
        np.testing.assert_array_equal(np.concatenate([p.val_batch(1) for p in parts]), whole.val_batch(1))


def test_validation_set_is_fixed(data_dir: Path) -> None:
    loader = _loader(data_dir, val_global_batch=4)
    assert loader.num_val_batches == ((VAL_LENGTH - 1) // SEQ) // 4
    first = list(loader.val_batches(3))
    again = list(loader.val_batches(3))
    assert len(first) == 3
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert first[0][0, 0] == 40000 and first[0][1, 0] == 40000 + SEQ  # in file order, not shuffled
    assert len(list(loader.val_batches())) == loader.num_val_batches
    with pytest.raises(ValueError, match=r"validation batch"):
        loader.val_batches(loader.num_val_batches + 1)


def test_prefetch_thread_stops_on_close(data_dir: Path) -> None:
    loader = _loader(data_dir)
    before = threading.active_count()
    batches = loader.iter_from(3, prefetch=1)
    step, _ = next(batches)
    assert step == 3
    batches.close()
    assert batches.closed and threading.active_count() == before
    with pytest.raises(StopIteration):
        next(batches)


def test_prefetch_reraises_errors_in_the_caller() -> None:
    def make(step: int) -> np.ndarray:
        if step == 2:
            raise RuntimeError("bad step")
        return np.full((1, 2), step)

    with BatchIterator(make, 0) as batches:
        assert next(batches)[0] == 0 and next(batches)[0] == 1
        with pytest.raises(RuntimeError, match=r"bad step"):
            next(batches)


def test_bad_token_found_when_its_window_is_read(tmp_path: Path) -> None:
    tokens = np.zeros(300_000, dtype=np.int64)
    tokens[150_000] = 65000
    shards.write_shard(tmp_path / "train_000000.bin", tokens)
    loader = TokenLoader.open(
        tmp_path, seq_len=1000, global_batch=299, seed=0, process_index=0, process_count=1, val_split=None
    )
    with pytest.raises(shards.ShardError, match=r"token id 65000"):
        with loader.iter_from(0) as batches:
            next(batches)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*data.prepare"):
        _loader(tmp_path / "missing")


def test_corrupt_shard_is_refused_on_open(data_dir: Path) -> None:
    with open(data_dir / "train_000001.bin", "r+b") as f:
        f.truncate(2000)
    with pytest.raises(shards.ShardError, match=r"truncated"):
        _loader(data_dir)


def test_batch_larger_than_data_is_refused(data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"global_batch 202 is larger than the data.*201 windows"):
        _loader(data_dir, global_batch=202)
    _loader(data_dir, global_batch=201)


def test_sequence_longer_than_shards_is_refused(data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"seq_len 1537 needs windows of 1538 tokens.*holds only 1537"):
        _loader(data_dir, seq_len=1537, global_batch=1)
    with pytest.warns(UserWarning, match=r"2 'train' shard"):
        loader = TokenLoader.open(
            data_dir, seq_len=1200, global_batch=1, process_index=0, process_count=1, val_split=None
        )
    assert loader.windows_per_epoch == 1


def test_invalid_process_layout_is_refused(data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"multiple of the number of processes"):
        _loader(data_dir, global_batch=9, process_count=2)
    with pytest.raises(ValueError, match=r"process_index 2"):
        _loader(data_dir, process_index=2, process_count=2)


def test_process_defaults_come_from_jax(data_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = TokenLoader(TokenShards.open(data_dir, "train"), None, seq_len=SEQ, global_batch=4)
    assert (loader.process_index, loader.process_count) == (0, 1)
