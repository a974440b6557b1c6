"""8x8 digit classification with an MLP, on scikit-learn's bundled digits (1,797 images)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from recipes.metatrain.config import FamilyConfig
from recipes.metatrain.tasks import Task, whole_window

NUM_CLASSES = 10
TRAIN_IMAGES = 1500  # the rest is held out for validation


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Images scaled to [0, 1] as float32 (n, 64) and labels int32 (n,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the image_mlp task family needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int32)


def digits_split(split: str) -> dict:
    x, y = digits()
    part = slice(0, TRAIN_IMAGES) if split == "train" else slice(TRAIN_IMAGES, None)
    return whole_window({"x": jnp.asarray(x[part]), "y": jnp.asarray(y[part])})


class DigitsMLP(Task):
    def __init__(self, family: FamilyConfig):
        self.name = family.name
        self.batch = family.batch
        self.widths = (64, *family.hidden, NUM_CLASSES)
        self.init_loss = math.log(NUM_CLASSES)
        self.data = digits_split("train")

    def fusion_key(self) -> tuple:
        return ("image_mlp", self.widths, self.batch)

    def init_params(self, key):
        params = {}
        keys = jax.random.split(key, len(self.widths) - 1)
        for i, (fan_in, fan_out) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            kernel = jax.random.truncated_normal(keys[i], -2.0, 2.0, (fan_in, fan_out)) / math.sqrt(fan_in)
            params[f"dense_{i}"] = {"kernel": kernel.astype(jnp.float32), "bias": jnp.zeros((fan_out,), jnp.float32)}
        return params

    def logits(self, params, x):
        n = len(self.widths) - 1
        for i in range(n):
            layer = params[f"dense_{i}"]
            x = x @ layer["kernel"] + layer["bias"]
            if i < n - 1:
                x = jax.nn.relu(x)
        return x

    def loss(self, params, key, data):
        idx = data["lo"] + jax.random.randint(key, (self.batch,), 0, data["n"])
        logits = self.logits(params, data["x"][idx])
        labels = data["y"][idx]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0])
