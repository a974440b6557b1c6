"""Pinned losses: any numerical change to the model, the loss, the data order or the optimizer shows here.

Measured in float32 with full-precision matmuls; the same four default-recipe losses came out of the
CPU side of the device check under jax 0.11.2, and within 5.7e-6 of them on an H200. The tolerance
covers other CPUs' summation orders, not a change of arithmetic (those move the loss by 1e-4 or more).
"""
import jax
import numpy as np
import pytest

from recipes.experiments.benchmarks import training_losses
from recipes.train import config as config_lib

TOLERANCE = 2e-5


def losses(overrides, steps):
    config = config_lib.load_config("shakespeare_celo2", ["--mesh.devices=1", *overrides])
    with jax.default_matmul_precision("highest"):
        return training_losses(config, steps, jax.devices()[0])


# The pinned values were measured once and written here. After an intended numerical change, print the
# new ones with `JAX_PLATFORMS=cpu .venv/bin/python -m tests.train.test_reference_loss` and replace them.
# No warmup: the first update is taken at the full learning rate (a warmup's step 0 has rate 0).
TINY = ["--model.size=tiny", "--data.seq_len=32", "--data.global_batch=8", "--optimizer.schedule.warmup_steps=0"]
TINY_LOSSES = [10.849804878234863, 10.164124488830566]
DEFAULT_RECIPE = ["--model.compute_dtype=float32"]
DEFAULT_RECIPE_LOSSES = [10.834515571594238, 10.836761474609375, 10.781375885009766, 10.646913528442383]


def test_the_first_step_of_a_tiny_model():
    """The loss before the first update and after it."""
    np.testing.assert_allclose(losses(TINY, 2), TINY_LOSSES, atol=TOLERANCE)


@pytest.mark.slow
def test_the_first_steps_of_the_default_recipe():
    np.testing.assert_allclose(losses(DEFAULT_RECIPE, 4), DEFAULT_RECIPE_LOSSES, atol=TOLERANCE)


if __name__ == "__main__":
    print("TINY_LOSSES =", losses(TINY, len(TINY_LOSSES)))
    print("DEFAULT_RECIPE_LOSSES =", losses(DEFAULT_RECIPE, len(DEFAULT_RECIPE_LOSSES)))
