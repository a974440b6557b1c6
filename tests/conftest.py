"""Every test process sees 8 simulated CPU devices, so sharding tests run anywhere.

JAX_PLATFORMS=cpu is also set for the subprocesses tests start: with the TPU runtime
installed (the [tpu] extra, for compile checks), a JAX process without it probes for a
TPU and prints warnings that would land in the one-line errors the tests read.
"""
import os

import jax
import pytest

os.environ["JAX_PLATFORMS"] = "cpu"
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny trained run directory with checkpoints at steps 4 and 8, shared by the tests of the tools
    that read a run (sample, export): copy it before damaging it."""
    import train
    from tests.helpers import TINY

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    train.main([*TINY, "--train.steps=8", "--train.checkpoint_every=4", f"--train.out_dir={run_dir}",
                "--eval.at_start=false"])
    return run_dir
