"""Every test process sees 8 simulated CPU devices, so sharding tests run anywhere.

One persistent compilation cache serves the whole run (both xdist workers and every process a test
starts), every compilation kept however quick: most tests build the same tiny programs again, and a
program compiled once is then loaded instead. XLA:CPU's backend runs at optimization level 0:
the suite's time is mostly compiling small programs that then run a few steps, and LLVM's
optimizations cost more there than they save. The programs are the same; their results agree with
the optimized build's to float32 rounding (1e-7 relative on a tiny run), inside every tolerance here.

JAX_PLATFORMS=cpu is also set for the subprocesses tests start: with the TPU runtime
installed (the [tpu] extra, for compile checks), a JAX process without it probes for a
TPU and prints warnings that would land in the one-line errors the tests read.
"""
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

# Set by the first process (pytest itself, or xdist's controller) and inherited by its workers.
RUN_ID = os.environ.setdefault("CELO2_GPT_TEST_RUN", str(os.getpid()))
COMPILATION_CACHE = Path(tempfile.gettempdir()) / f"celo2-gpt-tests-{RUN_ID}" / "jax_cache"

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(COMPILATION_CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, after every worker is done
        shutil.rmtree(COMPILATION_CACHE.parent, ignore_errors=True)


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
