"""The Celo2 weights meta-trained by this project ship with the package and drive the default recipe."""
import json

import numpy as np
import pytest

from recipes.optim.theta import (
    SHIPPED_THETAS,
    THETA_SHAPES,
    load_checkpoint,
    shipped_theta_path,
    theta_from_source,
)
from recipes.train.config import load_config
from recipes.metatrain.config import MetaTrainConfig


@pytest.mark.parametrize("name", SHIPPED_THETAS)
def test_shipped_theta_loads_in_the_official_format_with_its_config(name):
    path = shipped_theta_path(name)
    weights = load_checkpoint(path)["ff_mod_stack"]["~"]
    assert {k: v.shape for k, v in weights.items()} == THETA_SHAPES
    assert all(np.isfinite(v).all() for v in weights.values())
    # Meta-training moved it away from the theta its run started from.
    record = json.loads((path.parent / "config.json").read_text())
    record.pop("resolved_families")
    settings = MetaTrainConfig.from_dict(record).metatrain
    start = theta_from_source(settings.init_theta, settings.theta_seed)["ff_mod_stack"]["~"]
    assert any(not np.array_equal(weights[k], start[k]) for k in THETA_SHAPES)
    provenance = json.loads((path.parent / "provenance.json").read_text())
    assert provenance["outer_step"] > 0 and provenance["selected_by"]
    by_name = theta_from_source(name)["ff_mod_stack"]["~"]
    for key in THETA_SHAPES:
        np.testing.assert_array_equal(by_name[key], weights[key])


def test_default_recipe_uses_the_shipped_theta():
    config = load_config("shakespeare_celo2.yaml")
    assert config.optimizer.name == "celo2" and config.optimizer.theta in SHIPPED_THETAS


def test_unknown_shipped_name_is_refused():
    with pytest.raises(ValueError, match="not a shipped theta"):
        shipped_theta_path("nonexistent")
