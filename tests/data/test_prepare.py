import gzip
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import encode, prepare, prepare_corpus, shards, sources
from data.loader import TokenLoader, TokenShards
from data.tokenizer import EOT_TOKEN, gpt2_encoding

REPO = Path(__file__).resolve().parents[2]

TXT = "A text file is one document.\n\nIt has two paragraphs."
JSONL_DOCS = ["The quick brown fox.", "", "Naïve café — 東京 🙂", "jumps over\nthe lazy dog", "x" * 50]
PARQUET_DOCS = ["From a parquet row.", "Another parquet row, a little longer than the first one."]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    txt = tmp_path / "in" / "a.txt"
    txt.parent.mkdir()
    txt.write_text(TXT, encoding="utf-8")
    jsonl = tmp_path / "in" / "b.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(JSONL_DOCS)), encoding="utf-8"
    )
    parquet = tmp_path / "in" / "c.parquet"
    pq.write_table(pa.table({"text": PARQUET_DOCS}), parquet)
    return [txt, jsonl, parquet]


def _expected(documents: list[str], val_fraction: float) -> dict[str, list[int]]:
    enc = gpt2_encoding()
    out: dict[str, list[int]] = {"train": [], "val": []}
    for index, text in enumerate(documents):  # empty documents count in the stream, then are skipped
        if not text:
            continue
        split = "val" if sources.is_val_document(index, val_fraction) else "train"
        out[split] += [EOT_TOKEN, *enc.encode_ordinary(text)]
    return out


def _split_tokens(directory: Path, split: str) -> list[int]:
    return np.concatenate([s.tokens for s in TokenShards.open(directory, split).shards]).tolist()


def test_prepare_local_text_jsonl_and_parquet(inputs: list[Path], tmp_path: Path, no_network: None) -> None:
    out = tmp_path / "out"
    result = prepare_corpus.prepare_files(inputs, out, val_fraction=0.25, shard_size=20, workers=1, progress=False)
    expected = _expected([TXT, *JSONL_DOCS, *PARQUET_DOCS], 0.25)
    assert _split_tokens(out, "train") == expected["train"]
    assert _split_tokens(out, "val") == expected["val"]
    assert result.tokens == {s: len(expected[s]) for s in ("train", "val")}
    assert result.documents["train"] + result.documents["val"] == 7  # the empty document is skipped

    names = sorted(p.name for p in out.iterdir())
    n_train = -(-len(expected["train"]) // 20)
    assert names == sorted(
        [f"train_{i:06d}.bin" for i in range(n_train)]
        + [f"val_{i:06d}.bin" for i in range(len(result.shards["val"]))]
        + ["meta.json"]
    )
    assert all(shards.read_header(out / f"train_{i:06d}.bin")[2] == 20 for i in range(n_train - 1))

    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_token": 50256, "eot": "before each document"}
    assert meta["source"]["kind"] == "files" and meta["source"]["files"] == [str(p) for p in inputs]
    assert meta["split"]["val_fraction"] == 0.25
    assert meta["splits"]["train"]["tokens"] == len(expected["train"])
    assert meta["splits"]["train"]["shards"] == [f"train_{i:06d}.bin" for i in range(n_train)]
    assert meta["empty_documents_skipped"] == 1


def test_worker_count_does_not_change_the_output(
    inputs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode, "CHUNK_CHARS", 10)  # one document per chunk: many chunks in flight
    options = {"val_fraction": 0.3, "shard_size": 16, "progress": False}
    one = prepare_corpus.prepare_files(inputs, tmp_path / "one", workers=1, **options)
    two = prepare_corpus.prepare_files(inputs, tmp_path / "two", workers=2, **options)
    assert one.workers == 1 and two.workers == 2
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_command_prints_throughput(inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["--files", *map(str, inputs), "--out", str(out), "--workers", "2", "--val-fraction", "0.2", "--no-progress"]
    assert prepare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "tokens/s with 2 worker(s)" in printed and "train:" in printed
    loader = TokenLoader.open(out, seq_len=4, global_batch=2, process_index=0, process_count=1, val_global_batch=1)
    assert loader.train_batch(0).shape == (2, 5)

    assert prepare.main(argv) == 1  # refuses to mix with the data already there
    assert "--overwrite" in capsys.readouterr().err
    assert prepare.main([*argv, "--overwrite"]) == 0


def test_help_is_available() -> None:
    text = prepare.build_parser().format_help()
    for option in ("--preset", "--dataset", "--files", "--text-field", "--out", "--workers", "--val-fraction"):
        assert option in text
    assert "fineweb-edu" in text and "shakespeare" in text


def test_shakespeare_preset_offline(tmp_path: Path, no_network: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shakespeare"
    assert prepare.main(["--preset", "shakespeare", "--out", str(out), "--max-tokens", "300000", "--no-progress"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["kind"] == "bundled" and meta["split"] == {"val_plays": ["hamlet", "the-tempest"]}
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 300_000 <= total < 400_000  # stops after the play that reaches --max-tokens


def test_compressed_files_and_paragraph_documents(tmp_path: Path) -> None:
    jsonl = tmp_path / "docs.jsonl.gz"
    jsonl.write_bytes(gzip.compress(b'{"text": "first"}\n{"text": "second"}\n'))
    txt = tmp_path / "book.txt"
    txt.write_text("Chapter one.\n\nChapter two.\n\nChapter three.")
    result = prepare_corpus.prepare_files(
        [jsonl, txt], tmp_path / "out", text_unit="paragraph", val_fraction=0.0, workers=1, progress=False
    )
    assert result.documents["train"] == 5
    enc = gpt2_encoding()
    expected = [
        t
        for doc in ("first", "second", "Chapter one.", "Chapter two.", "Chapter three.")
        for t in [EOT_TOKEN, *enc.encode_ordinary(doc)]
    ]
    assert _split_tokens(tmp_path / "out", "train") == expected


def test_max_tokens_stops_after_the_document_that_reaches_it(inputs: list[Path], tmp_path: Path) -> None:
    full = prepare_corpus.prepare_files(inputs, tmp_path / "full", val_fraction=0.0, workers=1, progress=False)
    lengths = [1 + len(gpt2_encoding().encode_ordinary(t)) for t in [TXT, *JSONL_DOCS, *PARQUET_DOCS] if t]
    assert full.tokens["train"] == sum(lengths)
    limit = lengths[0] + lengths[1] + 1
    cut = prepare_corpus.prepare_files(
        inputs, tmp_path / "cut", val_fraction=0.0, workers=1, progress=False, max_tokens=limit
    )
    assert cut.tokens["train"] == sum(lengths[:3]) and cut.documents["train"] == 3


def test_empty_dataset_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(prepare_corpus.EmptyDatasetError, match=r"produced no tokens"):
        prepare_corpus.prepare_files([empty], tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()  # a failed prepare leaves no directory it created


def test_single_document_without_train_split_is_refused(tmp_path: Path) -> None:
    single = tmp_path / "one.txt"
    single.write_text("just one document")
    with pytest.raises(prepare_corpus.EmptyDatasetError, match=r"train split is empty.*--text-unit paragraph"):
        prepare_corpus.prepare_files([single], tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    result = prepare_corpus.prepare_files(
        [single], tmp_path / "out", val_fraction=0.0, workers=1, progress=False
    )  # or with no validation split at all
    assert result.tokens["val"] == 0 and result.shards["val"] == []


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not found"):
        prepare_corpus.prepare_files([tmp_path / "missing.jsonl"], tmp_path / "out")
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"unsupported file type"):
        prepare_corpus.prepare_files([tmp_path / "data.xml"], tmp_path / "out")
    other = tmp_path / "other.jsonl"
    other.write_text('{"content": "hello"}\n')
    with pytest.raises(ValueError, match=r"no field 'text'.*--text-field"):
        prepare_corpus.prepare_files([other], tmp_path / "out", workers=1, progress=False)
    result = prepare_corpus.prepare_files(
        [other], tmp_path / "out2", text_field="content", val_fraction=0.0, workers=1, progress=False
    )
    assert result.tokens["train"] == 2


def test_failure_midway_leaves_no_shards(tmp_path: Path) -> None:
    def documents() -> Iterator[tuple[str, str]]:
        for i in range(40):
            yield "train", f"document number {i} with a few words"
        raise RuntimeError("connection lost")

    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match=r"connection lost"):
        prepare_corpus.prepare_documents(
            documents(), out, source={}, split_rule={}, shard_size=8, workers=1, progress=False
        )
    assert not (tmp_path / "new").exists()  # neither the directories it created nor anything in them

    mine = tmp_path / "mine"  # a directory that was there before is left as it was
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match=r"connection lost"):
        prepare_corpus.prepare_documents(
            documents(), mine, source={}, split_rule={}, shard_size=8, workers=1, progress=False
        )
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_file_that_is_not_utf8_text_is_named_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.txt"
    good.write_text("Some text.\n\nAnd more.")
    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    latin1 = tmp_path / "old.md"  # its first bytes are plain ASCII: found as it is read
    latin1.write_bytes(b"plain words\n" * 1000 + "caf\u00e9\n".encode("latin-1"))
    packed = tmp_path / "notes.txt.gz"  # not gzip at all
    packed.write_text("plain text, wrongly named")
    cases = {binary: "a NUL byte at offset 0", latin1: "byte 0xe9 at offset 12,003", packed: "does not decompress"}
    for path, detail in cases.items():
        out = tmp_path / "out" / path.name
        assert prepare.main(["--files", str(good), str(path), "--out", str(out), "--workers", "1", "--no-progress"]) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {path} ") and detail in lines[0], lines
        assert "it out of --files" in lines[0]  # and what to do
        assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_our_files(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_corpus.prepare_files(inputs, out, val_fraction=0.0, shard_size=10, workers=1, progress=False)
    assert len(list(out.glob("train_*.bin"))) > 1
    (out / "README.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"--overwrite"):
        prepare_corpus.prepare_files(inputs, out, workers=1, progress=False)
    prepare_corpus.prepare_files(inputs, out, val_fraction=0.0, overwrite=True, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "meta.json", "train_000000.bin"]
    np.arange(10, dtype=np.uint16).tofile(out / "train.bin")  # someone else's data: never deleted
    with pytest.raises(FileExistsError, match=r"Choose another --out"):
        prepare_corpus.prepare_files(inputs, out, overwrite=True, workers=1, progress=False)
    assert (out / "train.bin").exists()


def test_validation_rule_holds_out_the_requested_fraction() -> None:
    flags = [sources.is_val_document(i, 0.01) for i in range(100_000)]
    assert flags[0] and abs(sum(flags) / len(flags) - 0.01) < 1e-4
    assert not any(sources.is_val_document(i, 0.0) for i in range(1000))


def test_unreachable_hub_dataset_explains_what_to_do(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE makes the hub client fail at once instead of retrying for half a minute.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "data.prepare", "--preset", "fineweb-edu", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 1
    assert "HuggingFaceFW/fineweb-edu" in run.stderr and "network access" in run.stderr
    assert "--files" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()
