"""Pinned losses: any numerical change to the model, the loss, the data order or the optimizer shows here.

Measured in float32 with full-precision matmuls; the same four default-recipe losses came out of the
CPU side of the device check under jax 0.11.2, and within 5.7e-6 of them on an H200. The tolerance
covers other CPUs' summation orders, not a change of arithmetic (those move the loss by 1e-4 or more).
"""
import jax
import numpy as np

from recipes.experiments.benchmarks import training_losses
from recipes.train import config as config_lib

TOLERANCE = 2e-5


def losses(overrides, steps):
    config = config_lib.load_config("shakespeare_celo2", ["--mesh.devices=1", *overrides])
    with jax.default_matmul_precision("highest"):
        return training_losses(config, steps, jax.devices()[0])


def test_the_first_step_of_a_tiny_model():
    got = losses(["--model.size=tiny", "--data.seq_len=32", "--data.global_batch=8"], 3)
    np.testing.assert_allclose(got, [10.849804878234863, 10.83469009399414, 10.802680015563965], atol=TOLERANCE)


def test_the_first_steps_of_the_default_recipe():
    got = losses(["--model.compute_dtype=float32"], 4)
    np.testing.assert_allclose(got, [10.834515571594238, 10.836761474609375, 10.781375885009766, 10.646913528442383],
                               atol=TOLERANCE)
