"""The 8x8 image sets that meta-training tasks read: shapes, ranges, determinism, no network."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recipes.metatrain import image_datasets

ROOT = Path(__file__).resolve().parents[2]


def _available(name):
    try:
        image_datasets.split(name, "train")
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"{name}: {error}")


@pytest.mark.parametrize("name", image_datasets.NAMES)
def test_splits_are_8x8_images_in_unit_range_with_valid_labels(name):
    _available(name)
    classes = {"photos": 9}.get(name, 10)
    for part in ("train", "val"):
        x, y = image_datasets.split(name, part)
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.ndim == 2 and x.shape[1] == 64 and len(x) == len(y) > 200
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
        assert set(np.unique(y).tolist()) == set(range(classes))  # every class in both splits


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_shuffled_splits_do_not_overlap(name):
    _available(name)
    train, _ = image_datasets.split(name, "train")
    val, _ = image_datasets.split(name, "val")
    seen = {row.tobytes() for row in train}
    assert sum(row.tobytes() in seen for row in val) < 0.01 * len(val)  # only genuinely repeated images


def test_digits_keep_their_original_split():
    x, _ = image_datasets.split("digits", "train")
    assert len(x) == 1500


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown image dataset 'cifar'"):
        image_datasets.split("cifar", "train")
    with pytest.raises(ValueError, match="split must be"):
        image_datasets.split("digits", "test")


def test_sets_are_built_without_network_and_identically_each_time(tmp_path):
    """Two fresh processes with sockets disabled build every available set to the same bytes."""
    script = (
        "import hashlib, sys\n"
        "def refuse(event, args):\n"
        "    if event in ('socket.connect', 'socket.getaddrinfo'): raise OSError(f'network used: {args}')\n"
        "sys.addaudithook(refuse)\n"
        "from recipes.metatrain import image_datasets as d\n"
        "for name in d.NAMES:\n"
        "    try: x, y = d.split(name, 'train')\n"
        "    except FileNotFoundError: continue\n"
        "    print(name, hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest())\n"
    )
    runs = [subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout
    assert {"digits", "mnist", "photos"} <= {line.split()[0] for line in runs[0].stdout.splitlines()}


def test_missing_fashion_mnist_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(image_datasets, "FASHION_MNIST_DIR", tmp_path)
    image_datasets._fashion_mnist.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            image_datasets.split("fashion_mnist", "train")
    finally:
        image_datasets._fashion_mnist.cache_clear()


@pytest.mark.parametrize("name", image_datasets.NAMES)
def test_every_set_trains_as_a_task_family_with_loss_near_log10_at_init(name):
    import jax

    from recipes.metatrain.config import FamilyConfig
    from recipes.metatrain.tasks import build_task

    _available(name)
    task = build_task(FamilyConfig(kind="image_mlp", dataset=name, hidden=(32,), batch=64))
    assert task.name == f"{name}_mlp_32"
    params = task.init_params(jax.random.key(0))
    loss = float(task.loss(params, jax.random.key(1), task.data))
    assert abs(loss - np.log(10)) < 0.6
