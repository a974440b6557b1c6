"""XLA:CPU settings for particles split over CPU devices."""
from __future__ import annotations

import os


def allow_slow_collectives() -> None:
    """The particles' devices meet in collectives, which XLA:CPU aborts after 40 s by default; a
    niced run on a busy machine can wait longer than that for a core. Call before JAX starts.
    (jaxlib 0.10 renamed the warning flag, and aborts on an unknown one.)"""
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600",
                                        "--xla_cpu_collective_call_terminate_timeout_seconds=86400"]).strip()
