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


def test_gradients_cross_the_data_axis_once_a_step_however_many_micro_batches():
    """With data parallelism over slow links (mesh.dcn_data), the gradients must cross them once a step:
    each data shard accumulates its own micro-batches and the shards are averaged after."""
    from recipes.experiments.hlo_collectives import collectives
    from recipes.train.build import build_program
    from recipes.train.config import load_config

    def bytes_across_data(micro_batch: int) -> int:
        config = load_config(None, ["--model.size=tiny", "--model.vocab_size=256", "--data.global_batch=32",
                                    f"--data.micro_batch={micro_batch}", "--mesh.data=2", "--mesh.fsdp=4",
                                    "--optimizer.name=adamw"])
        program = build_program(config, devices=jax.devices()[:8])
        # The two data shards as two hosts (the mesh is data-major: positions 0-3 are data shard 0), so
        # a collective between them is one the slow links would carry.
        granule_of = [position // 4 for position in range(8)]
        return collectives(program.compile().as_text(), granule_of)["level_totals"]["dcn"]

    once = bytes_across_data(32)
    assert once > 0
    assert bytes_across_data(8) <= 1.1 * once  # 4 micro-batches: reduced per micro-batch this was 4x


def test_cudnn_attention_compiles_inside_the_per_data_shard_accumulation():
    """On GPUs with data parallelism and micro-batches (several nodes by default), cuDNN's fused attention
    runs inside the train step's shard_map over 'data': compiled here for a node of 8 H100s."""
    from recipes.experiments.gpu_slices import cuda_missing, gpu_devices, parse_gpu
    from recipes.train.build import build_program
    from recipes.train.config import load_config

    if missing := cuda_missing():
        pytest.skip(missing)
    try:
        devices = gpu_devices(parse_gpu("h100-8"))
    except (NotImplementedError, RuntimeError) as error:  # the CUDA plugin did not initialise here
        pytest.skip(f"no compile-only CUDA topology: {error}")
    config = load_config(None, ["--model.size=tiny", "--model.compute_dtype=bfloat16", "--data.global_batch=16",
                                "--data.micro_batch=8", "--mesh.data=2", "--mesh.fsdp=4", "--model.n_layer=1",
                                "--optimizer.name=adamw"])  # Celo2's update would take minutes to compile for a GPU
    program = build_program(config, devices=devices, shapes_only=True, diagnostics=False)
    assert "__cudnn$fmha" in program.compile().as_text()
