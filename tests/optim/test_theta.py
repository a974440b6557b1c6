"""Celo2 weights on disk: the official msgpack format, strict validation, Hub references from a local cache."""

import socket
from pathlib import Path

import jax
import msgpack
import numpy as np
import pytest
from flax import serialization

from recipes.optim.theta import (
    THETA_SHAPES,
    ThetaFormatError,
    init_theta,
    load_checkpoint,
    normalized_momentum_theta,
    save_checkpoint,
)

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "celo2_golden_theta.state"


def _weights(theta):
    return theta["ff_mod_stack"]["~"]


def test_official_file_round_trips_byte_for_byte(tmp_path):
    theta = load_checkpoint(GOLDEN)
    assert set(_weights(theta)) == set(THETA_SHAPES)
    assert sum(np.asarray(w).size for w in _weights(theta).values()) == 347
    written = save_checkpoint(theta, tmp_path / "theta.state")
    assert written.read_bytes() == GOLDEN.read_bytes()


def test_directory_sources_and_fresh_thetas(tmp_path):
    for theta in (init_theta(jax.random.key(0)), normalized_momentum_theta()):
        save_checkpoint(theta, tmp_path)  # a directory gets theta.state inside
        loaded = load_checkpoint(tmp_path)
        for name, value in _weights(theta).items():
            np.testing.assert_array_equal(_weights(loaded)[name], value)
    assert not list(tmp_path.glob(".theta.state.*")), "no temporary file is left behind"


def _write_tree(path, weights):
    path.write_bytes(serialization.msgpack_serialize({"ff_mod_stack": {"~": weights}}))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w.update(w0__3=np.zeros((2, 8), np.float32)), r"key 'w0__3' has shape \(2, 8\), expected \(3, 8\)"),
        (lambda w: w.pop("b1"), r"missing keys \['b1'\]"),
        (lambda w: w.update(extra=np.zeros(3, np.float32)), r"unexpected keys \['extra'\]"),
        (lambda w: w.update(w1=np.zeros((8, 8), np.float64)), r"key 'w1' has dtype float64, expected float32"),
    ],
    ids=["shape", "missing", "unexpected", "dtype"],
)
def test_malformed_files_are_refused_with_the_key_named(tmp_path, mutate, message):
    weights = {k: np.asarray(v) for k, v in _weights(load_checkpoint(GOLDEN)).items()}
    mutate(weights)
    with pytest.raises(ThetaFormatError, match=message):
        load_checkpoint(_write_tree(tmp_path / "theta.state", weights))


def test_wrong_nesting_truncation_and_foreign_files_are_refused(tmp_path):
    wrong_nesting = tmp_path / "nesting.state"
    wrong_nesting.write_bytes(serialization.msgpack_serialize({"params": {"w": np.zeros(2, np.float32)}}))
    with pytest.raises(ThetaFormatError, match="expected top-level key 'ff_mod_stack'"):
        load_checkpoint(wrong_nesting)

    truncated = tmp_path / "truncated.state"
    truncated.write_bytes(GOLDEN.read_bytes()[:700])
    with pytest.raises(ThetaFormatError, match="truncated"):
        load_checkpoint(truncated)

    # A pickle is never unpickled: it is just not msgpack of the right structure.
    pickled = tmp_path / "pickled.state"
    pickled.write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.")
    with pytest.raises(ThetaFormatError):
        load_checkpoint(pickled)

    plain_msgpack = tmp_path / "list.state"
    plain_msgpack.write_bytes(msgpack.packb([1, 2, 3]))
    with pytest.raises(ThetaFormatError):
        load_checkpoint(plain_msgpack)

    with pytest.raises(FileNotFoundError, match="No Celo2 theta"):
        load_checkpoint(tmp_path / "absent.state")


def _populate_hub_cache(cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub writes when it downloads a file."""
    revision = "0" * 40
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "theta.state").write_bytes(GOLDEN.read_bytes())


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_reference_is_served_from_the_local_cache_offline(tmp_path, no_network):
    _populate_hub_cache(tmp_path, "amoudgl/celo2")
    theta = load_checkpoint("hf://amoudgl/celo2", cache_dir=tmp_path)
    np.testing.assert_array_equal(_weights(theta)["w2"], _weights(load_checkpoint(GOLDEN))["w2"])


def test_hub_reference_missing_everywhere_names_the_download_command(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="hf download amoudgl/celo2-base theta.state"):
        load_checkpoint("hf://amoudgl/celo2-base", cache_dir=tmp_path, local_only=True)
    with pytest.raises(FileNotFoundError, match="hf download amoudgl/celo2-base theta.state"):
        load_checkpoint("hf://amoudgl/celo2-base", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="hf://OWNER/REPO"):
        load_checkpoint("hf://celo2")


def test_unreachable_hub_is_tried_once_not_retried(tmp_path, monkeypatch):
    from urllib.parse import urlparse

    from huggingface_hub import constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[-1])  # the address: create_connection((host, port)), sock.connect((host, port))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(FileNotFoundError, match="Hub is not reachable"):
        load_checkpoint("hf://amoudgl/celo2-base", cache_dir=tmp_path)
    # One quick probe; the Hub client's retries never start. Only the Hub's address is counted: a
    # library's background thread left by another test may try its own connection meanwhile.
    endpoint = urlparse(constants.ENDPOINT)
    hub = (endpoint.hostname, endpoint.port or 443)
    assert [a for a in attempts if isinstance(a, tuple) and a[0] == hub[0]] == [hub]
