"""The one build path: what it resolves for the devices a program targets."""
import jax
import numpy as np
import pytest

from model import make_mesh
from model.config import ModelConfig
from recipes.train import config as config_lib
from recipes.train.build import build_program, for_platform


def test_attention_is_chosen_for_the_target_platform_not_the_host():
    bf16 = ModelConfig.named("tiny", compute_dtype="bfloat16")
    assert for_platform(bf16, "gpu").attention_impl == "cudnn"
    assert for_platform(bf16, "tpu").attention_impl == "xla"
    assert for_platform(bf16, "cpu").attention_impl == "xla"
    assert for_platform(ModelConfig.named("tiny"), "gpu").attention_impl == "xla"  # cuDNN's kernel wants bf16
    pinned = ModelConfig.named("tiny", compute_dtype="bfloat16", attention_impl="xla")
    assert for_platform(pinned, "gpu") is pinned


@pytest.mark.slow
def test_the_compiled_program_trains_like_the_jitted_one():
    """compile() is what the compile check measures: it must be the step train.py runs."""
    config = config_lib.load_config("shakespeare_celo2", ["--model.size=tiny", "--model.vocab_size=512",
                                                          "--data.seq_len=16", "--data.global_batch=8",
                                                          "--optimizer.theta=celo2_lm"])
    program = build_program(config, mesh=make_mesh(1, 2, 1, devices=jax.devices()[:2]))
    tokens = jax.device_put(np.random.default_rng(0).integers(0, 512, (8, 17), dtype=np.int32),
                            program.batch_sharding)
    first, second = program.init_state(), program.init_state()
    with jax.set_mesh(program.mesh):
        _, jitted = program.train_step(first, tokens)
        _, compiled = program.compile()(second, tokens)
    assert float(jitted["loss"]) == float(compiled["loss"]) and bool(compiled["finite"])
