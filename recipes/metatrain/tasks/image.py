"""Image classification with an MLP on an 8x8 set from ``image_datasets`` (digits by default)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from recipes.metatrain import image_datasets
from recipes.metatrain.config import FamilyConfig
from recipes.metatrain.tasks.base import Task, whole_window


def image_split(dataset: str, part: str) -> dict:
    x, y = image_datasets.split(dataset, part)
    return whole_window({"x": jnp.asarray(x), "y": jnp.asarray(y)})


class ImageMLP(Task):
    def __init__(self, family: FamilyConfig, split: str = "train"):
        self.name = family.name
        self.batch = family.batch
        self.widths = (64, *family.hidden, image_datasets.OUTPUTS)
        self.init_loss = math.log(image_datasets.OUTPUTS)
        self.data = image_split(family.dataset, split)

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
