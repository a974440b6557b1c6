from pathlib import Path

import pytest

from data import cache


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "celo2-gpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_dir() == tmp_path / "home" / ".cache" / "celo2-gpt"
    assert cache.jax_cache_dir() == tmp_path / "home" / ".cache" / "celo2-gpt" / "jax"  # not ./cache/jax


def test_tiktoken_cache_dir_follows_tiktoken_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    default = cache.tiktoken_cache_dir()
    assert default is not None and default.name == "data-gym-cache"
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "gym"))
    assert cache.tiktoken_cache_dir() == tmp_path / "gym"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tik"))
    assert cache.tiktoken_cache_dir() == tmp_path / "tik"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert cache.tiktoken_cache_dir() is None
