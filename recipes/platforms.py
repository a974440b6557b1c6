"""Only the accelerators that are here: a machine with no GPU or TPU runs on its CPU, quietly.

With the [cuda] or [tpu] extra installed, JAX probes each plugin on first use even where the
chip is absent, and the probes print tracebacks (cuPTI) or runtime warnings (libtpu) before a
run's first line. When JAX_PLATFORMS is unset and no accelerator device exists on this
machine, it is set to cpu; an explicit JAX_PLATFORMS always wins.
"""
from __future__ import annotations

import glob
import os
import sys

# Device files the drivers create: NVIDIA GPUs, TPUs (accel on v4 and older, vfio from v5), AMD GPUs.
ACCELERATOR_DEVICES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


def accelerators_present() -> bool:
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def use_cpu_without_accelerators() -> None:
    """Sets JAX_PLATFORMS=cpu (for this process and those it starts) where no accelerator exists."""
    if os.environ.get("JAX_PLATFORMS") or accelerators_present():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: its config read the variable at import
        sys.modules["jax"].config.update("jax_platforms", "cpu")
