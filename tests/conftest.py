"""Every test process sees 8 simulated CPU devices, so sharding tests run anywhere.

JAX_PLATFORMS=cpu is also set for the subprocesses tests start: with the TPU runtime
installed (the [tpu] extra, for compile checks), a JAX process without it probes for a
TPU and prints warnings that would land in the one-line errors the tests read.
"""
import os

import jax

os.environ["JAX_PLATFORMS"] = "cpu"
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
