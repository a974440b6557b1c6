"""Celo2's MLP weights (theta): the official ``theta.state`` format, loading, saving, construction.

The format is a flax msgpack file of ``{"ff_mod_stack": {"~": {name: float32 array}}}``
with the 19 arrays of THETA_SHAPES (347 numbers). msgpack is parsed by flax's
restorer, which only rebuilds arrays and plain containers: nothing is unpickled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from data.files import atomic_write

HUB_PREFIX = "hf://"
THETA_FILENAME = "theta.state"
# Thetas built in code, and thetas meta-trained by this project and shipped as
# recipes/optim/weights/NAME/theta.state (with the meta-training config beside it).
BUILT_THETAS = ("normalized_momentum", "random")
SHIPPED_THETAS = ("celo2_lm", "celo2_repro")
THETA_NAMES = BUILT_THETAS + SHIPPED_THETAS
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FEATURE_CHANNELS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)  # groups 0..13 of the input features
HIDDEN = 8
OUTPUTS = 3

THETA_SHAPES: dict[str, tuple[int, ...]] = {
    **{f"w0__{i}": (channels, HIDDEN) for i, channels in enumerate(FEATURE_CHANNELS)},
    "b0": (HIDDEN,),
    "w1": (HIDDEN, HIDDEN),
    "b1": (HIDDEN,),
    "w2": (HIDDEN, OUTPUTS),
    "b2": (OUTPUTS,),
}


class ThetaFormatError(ValueError):
    """A theta file or tree that is not in the official Celo2 format."""


def _wrap(weights: dict) -> dict:
    return {"ff_mod_stack": {"~": weights}}


def validate_theta(theta, source: str = "theta") -> dict:
    """Checks the official structure exactly and returns it with float32 leaves."""
    if not isinstance(theta, dict) or set(theta) != {"ff_mod_stack"}:
        found = sorted(theta) if isinstance(theta, dict) else type(theta).__name__
        raise ThetaFormatError(f"{source}: expected top-level key 'ff_mod_stack', found {found}")
    stack = theta["ff_mod_stack"]
    if not isinstance(stack, dict) or set(stack) != {"~"}:
        found = sorted(stack) if isinstance(stack, dict) else type(stack).__name__
        raise ThetaFormatError(f"{source}: expected key 'ff_mod_stack/~', found {found}")
    weights = stack["~"]
    if not isinstance(weights, dict):
        raise ThetaFormatError(f"{source}: 'ff_mod_stack/~' should hold named arrays, found {type(weights).__name__}")
    missing = sorted(set(THETA_SHAPES) - set(weights))
    unexpected = sorted(set(weights) - set(THETA_SHAPES))
    if missing or unexpected:
        raise ThetaFormatError(f"{source}: missing keys {missing}, unexpected keys {unexpected} under 'ff_mod_stack/~'")
    checked = {}
    for name, expected in THETA_SHAPES.items():
        value = weights[name]
        if isinstance(value, jax.core.Tracer):
            shape, dtype = tuple(value.shape), np.dtype(value.dtype)
        else:
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                raise ThetaFormatError(f"{source}: key '{name}' holds {type(value).__name__}, expected an array of shape {expected}")
            shape, dtype = tuple(value.shape), np.dtype(value.dtype)
        if shape != expected:
            raise ThetaFormatError(f"{source}: key '{name}' has shape {shape}, expected {expected}")
        if dtype != np.float32:
            raise ThetaFormatError(f"{source}: key '{name}' has dtype {dtype}, expected float32")
        # Concrete weights only (a traced theta, as in meta-training, has no values to check).
        if not isinstance(value, jax.core.Tracer) and not np.isfinite(np.asarray(value)).all():
            bad = int((~np.isfinite(np.asarray(value))).sum())
            raise ThetaFormatError(f"{source}: key '{name}' holds {bad} non-finite value(s) (NaN or inf); "
                                   "these weights would turn every update into NaN: use another theta")
        checked[name] = value
    return _wrap(checked)


def init_theta(key: jax.Array) -> dict:
    """A fresh random theta: truncated normal with std 1/sqrt(fan_in), zero biases."""
    total_inputs = sum(FEATURE_CHANNELS)
    matrices = {name: shape for name, shape in THETA_SHAPES.items() if not name.startswith("b")}
    # One draw for all matrices (one compilation), cut into pieces.
    sample = np.asarray(jax.random.truncated_normal(key, -2.0, 2.0, (sum(math.prod(s) for s in matrices.values()),)))
    weights, offset = {}, 0
    for name, shape in THETA_SHAPES.items():
        if name.startswith("b"):
            weights[name] = np.zeros(shape, np.float32)
            continue
        size = math.prod(shape)
        fan_in = total_inputs if name.startswith("w0__") else HIDDEN
        weights[name] = (sample[offset : offset + size].reshape(shape) / np.sqrt(fan_in)).astype(np.float32)
        offset += size
    return _wrap(weights)


def normalized_momentum_theta() -> dict:
    """A hand-made theta whose step is momentum over the RMS of the gradient.

    Hidden units 0 and 1 carry relu(x) and relu(-x) of the normalized feature
    m_0.9 * rsqrt(v); the output recombines them into x. Celo2-base then steps
    along m / sqrt(v) scaled to RMS 1, and Celo2 along its orthogonalization:
    a documented stand-in for trained weights and a meta-training start.
    """
    weights = {name: np.zeros(shape, np.float32) for name, shape in THETA_SHAPES.items()}
    weights["w0__5"][0, 0], weights["w0__5"][0, 1] = 1.0, -1.0
    weights["w1"][0, 0], weights["w1"][1, 1] = 1.0, 1.0
    weights["w2"][0, 0], weights["w2"][1, 0] = 1.0, -1.0
    return _wrap(weights)


def shipped_theta_path(name: str) -> Path:
    """The theta.state of a theta shipped with the package (one of SHIPPED_THETAS)."""
    if name not in SHIPPED_THETAS:
        raise ValueError(f"{name!r} is not a shipped theta; shipped: {list(SHIPPED_THETAS)}")
    path = WEIGHTS_DIR / name / THETA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"The shipped theta {name!r} is missing at {path}: reinstall the package")
    return path


def theta_from_source(source: str, seed: int = 0, local_only: bool = False) -> dict:
    """Theta named by a built-in (THETA_NAMES), a theta.state path, a directory holding one, or hf://OWNER/REPO."""
    if source == "normalized_momentum":
        return normalized_momentum_theta()
    if source == "random":
        return init_theta(jax.random.key(seed))
    if source in SHIPPED_THETAS:
        return load_checkpoint(shipped_theta_path(source))
    return load_checkpoint(source, local_only=local_only)


def resolve_theta(source: str, seed: int = 0, setting: str = "theta") -> dict:
    """The theta ``source`` names (as theta_from_source reads it) as float32 arrays. One that cannot be
    found raises FileNotFoundError naming ``setting``, the option it came from, and what is accepted."""
    try:
        theta = theta_from_source(source, seed=seed)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{setting}={source!r} could not be loaded ({error}). Pass a theta.state path, "
            f"hf://OWNER/REPO, or one of {list(THETA_NAMES)}"
        ) from None
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta)


def to_bytes(theta) -> bytes:
    weights = validate_theta(theta)["ff_mod_stack"]["~"]
    return serialization.msgpack_serialize(_wrap({name: np.asarray(weights[name], np.float32) for name in sorted(weights)}))


def from_bytes(raw: bytes, source: str = "theta") -> dict:
    try:
        tree = serialization.msgpack_restore(raw)
    except Exception as error:  # msgpack raises several types for truncated or foreign data
        raise ThetaFormatError(
            f"{source}: not a readable theta.state msgpack file ({type(error).__name__}: {error}); "
            "the file may be truncated or not a Celo2 checkpoint"
        ) from None
    return validate_theta(tree, source)


def save_checkpoint(theta, path: str | os.PathLike) -> Path:
    """Writes theta in the official format (atomically: a temporary file, then a rename)."""
    path = Path(path)
    if path.is_dir():
        path = path / THETA_FILENAME
    raw = to_bytes(theta)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, raw)


def _check_hub_reachable(timeout_s: float = 3.0) -> None:
    """One quick connection attempt, so an offline machine fails in seconds, not after the
    Hub client's retries (about half a minute)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE is set")
    with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s):
        pass


def _resolve_hub(reference: str, local_only: bool, cache_dir: str | os.PathLike | None) -> Path:
    """hf://OWNER/REPO[/FILE] -> a local file from the Hugging Face cache, or the Hub."""
    from huggingface_hub import hf_hub_download

    parts = reference[len(HUB_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"'{reference}' is not a Hub reference: use hf://OWNER/REPO, for example hf://amoudgl/celo2")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or THETA_FILENAME
    command = f"hf download {repo_id} {filename}"
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True, cache_dir=cache_dir))
    except Exception:
        if local_only:
            raise FileNotFoundError(
                f"{reference} is not in the local Hugging Face cache. Fetch it on a machine with "
                f"network access with `{command}` (and copy the cache), or pass a local path to theta.state."
            ) from None
    try:
        _check_hub_reachable()
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir))
    except Exception as error:
        raise FileNotFoundError(
            f"Could not get {reference}: it is not in the local Hugging Face cache and the Hub is not "
            f"reachable ({type(error).__name__}). Run `{command}` where there is network access "
            f"(then copy the cache), or pass a local path to theta.state."
        ) from None


def load_checkpoint(
    source: str | os.PathLike, local_only: bool = False, cache_dir: str | os.PathLike | None = None
) -> dict:
    """Loads theta from a theta.state path, a directory holding one, or hf://OWNER/REPO.

    Hub references are served from the local Hugging Face cache first, so they
    work offline once fetched; ``local_only`` never touches the network;
    ``cache_dir`` overrides the Hugging Face cache location.
    """
    text = str(source)
    path = _resolve_hub(text, local_only, cache_dir) if text.startswith(HUB_PREFIX) else Path(text).expanduser()
    if path.is_dir():
        path = path / THETA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"No Celo2 theta at {path}: pass a theta.state file, a directory holding one, or hf://OWNER/REPO")
    return from_bytes(path.read_bytes(), str(path))
