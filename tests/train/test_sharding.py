"""8 simulated CPU devices with data x fsdp sharding train like 1 device.

Sharded runs sum in a different order (per-shard partial sums, then an all-reduce), so
curves agree to float32 rounding, not bitwise: the tolerance is SHARDED_RTOL (2e-5) relative
on the loss over 4 steps (observed: about 3e-7).
"""
import jax
import numpy as np
import pytest

import train
from tests.helpers import SHARDED_RTOL, TINY, train_losses


@pytest.mark.slow
def test_data_fsdp_sharding_matches_one_device(tmp_path):
    assert jax.device_count() == 8
    common = [*TINY, "--train.steps=4", "--data.global_batch=16", "--data.micro_batch=8", "--eval.at_start=false"]
    one = train.main([*common, "--mesh.devices=1", f"--train.out_dir={tmp_path / 'one'}"])
    eight = train.main([*common, "--mesh.devices=8", "--mesh.data=2", "--mesh.fsdp=4",
                        f"--train.out_dir={tmp_path / 'eight'}"])
    # The weights gathered once a step instead of once per micro-batch: the same training.
    once = train.main([*common, "--mesh.devices=8", "--mesh.data=2", "--mesh.fsdp=4", "--mesh.gather_weights=step",
                       f"--train.out_dir={tmp_path / 'once'}"])
    curve_one, curve_eight = train_losses(tmp_path / "one"), train_losses(tmp_path / "eight")
    assert len(curve_one) == len(curve_eight) == 4
    np.testing.assert_allclose(curve_eight, curve_one, rtol=SHARDED_RTOL)
    np.testing.assert_allclose(eight["val_loss"], one["val_loss"], rtol=SHARDED_RTOL)
    np.testing.assert_allclose(train_losses(tmp_path / "once"), curve_one, rtol=SHARDED_RTOL)
    np.testing.assert_allclose(once["val_loss"], one["val_loss"], rtol=SHARDED_RTOL)
    config = (tmp_path / "eight" / "config.yaml").read_text()
    assert "fsdp: 4" in config


def test_batch_placement_follows_the_models_batch_rule(monkeypatch):
    """The trainer places token windows by the model's logical rule, not by a spec of its own."""
    import jax
    from jax.sharding import PartitionSpec

    from model import make_mesh
    from model import sharding as model_sharding
    from recipes.train import mesh as mesh_lib

    mesh = make_mesh(2, 4, 1, devices=jax.devices()[:8])
    assert mesh_lib.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"), None)
    assert mesh_lib.batch_shards(mesh) == 8
    monkeypatch.setitem(model_sharding.LOGICAL_RULES, "batch", "data")
    assert mesh_lib.batch_sharding(mesh).spec == PartitionSpec("data", None)
    assert mesh_lib.batch_shards(mesh) == 2
