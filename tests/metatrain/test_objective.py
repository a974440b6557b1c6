"""The two meta-objectives a truncation can report: the steps' training losses, or unseen batches."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("sklearn")

from recipes.optim.theta import normalized_momentum_theta  # noqa: E402
from recipes.metatrain.config import MetaTrainConfig  # noqa: E402
from recipes.metatrain.population import UNSEEN_BATCHES, Population  # noqa: E402
from recipes.metatrain.tasks import build_task  # noqa: E402
from recipes.metatrain.tasks.base import reparameterized_loss  # noqa: E402

SETTINGS = {"pes": {"particles": 2, "truncation": 3, "min_length": 10, "max_length": 10},
            "inner": {"scale_min": 1.0, "scale_max": 1.0},
            "families": [{"kind": "image_mlp", "hidden": [8], "batch": 8}]}


@pytest.mark.slow
def test_final_unseen_loss_scores_the_final_parameters_on_batches_no_step_used():
    config = MetaTrainConfig.from_dict(SETTINGS)
    task = build_task(config.families[0])
    theta = jax.tree.map(jnp.asarray, normalized_momentum_theta())
    key, data = jax.random.key(3), task.data
    start = Population(task, config.pes, config.inner).fresh(jax.random.key(0))
    results = {}
    for objective in ("mean_train_loss", "final_unseen_loss"):
        population = Population(task, dataclasses.replace(config.pes, objective=objective), config.inner)
        results[objective] = population.unroll(theta, start, key, data)
    (trained, mean_train), (trained_too, unseen) = results["mean_train_loss"], results["final_unseen_loss"]
    np.testing.assert_array_equal(jax.tree.leaves(trained.params)[0], jax.tree.leaves(trained_too.params)[0])

    loss = reparameterized_loss(task, start.log_scale)
    truncation = config.pes.truncation
    # The batches the steps trained on are keys 0..truncation-1; the objective's come after them.
    expected = np.mean([loss(trained.params, jax.random.fold_in(key, truncation + j), data) / task.init_loss
                        for j in range(UNSEEN_BATCHES)])
    np.testing.assert_allclose(float(unseen), expected, rtol=1e-6)
    step_batch = float(loss(trained.params, jax.random.fold_in(key, truncation - 1), data)) / task.init_loss
    assert abs(float(unseen) - step_batch) > 1e-6  # not the last step's own batch
    assert abs(float(unseen) - float(mean_train)) > 1e-4


def test_an_unknown_objective_is_one_clear_error():
    from model.config_base import ConfigError

    with pytest.raises(ConfigError, match="pes.objective"):
        MetaTrainConfig.from_dict({**SETTINGS, "pes": {**SETTINGS["pes"], "objective": "final_loss"}})
