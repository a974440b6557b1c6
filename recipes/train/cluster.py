"""Starting JAX's multi-controller runtime on a cluster, before anything touches a JAX backend.

``mesh.distributed: auto`` starts it when a cluster launched this process with others: inside a
Slurm step of several tasks, under Open MPI's mpirun, on a worker of a TPU pod slice (or of
several slices), or in a Kubernetes indexed job. JAX then finds the coordinator, the process
count and this process's id by itself. Anywhere else the run stays one process.

A coordinator that does not answer would make JAX's runtime abort the process with a native
stack dump after its timeout; it is probed first, so the run ends with one line naming it.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from model.config_base import ConfigError


def _several(variable: str) -> bool:
    try:
        return int(os.environ.get(variable, "1")) > 1
    except ValueError:
        return False


# What each cluster's launcher sets in every process it starts (JAX reads the same variables).
CLUSTERS = {
    "Slurm": lambda: all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID",
                                                   "SLURM_LOCALID")) and _several("SLURM_NTASKS"),
    "Open MPI": lambda: "OMPI_MCA_orte_hnp_uri" in os.environ and _several("OMPI_COMM_WORLD_SIZE"),
    "a TPU pod": lambda: "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
                         or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ,
    "a Kubernetes indexed job": lambda: "KUBERNETES_SERVICE_HOST" in os.environ
                                        and "JOB_COMPLETION_INDEX" in os.environ,
}


def detected_cluster() -> str | None:
    """The name of the cluster that launched this process among others, or None."""
    return next((name for name, present in CLUSTERS.items() if present()), None)


def first_slurm_host(node_list: str) -> str:
    """The first host of a Slurm node list: 'gpu[007-012,020],cpu1' -> 'gpu007'."""
    head = node_list.split(",", 1)[0] if "[" not in node_list.split(",", 1)[0] else node_list
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.split(",", 1)[0].split("-", 1)[0].rstrip("]")


def slurm_settings() -> dict:
    """Where a Slurm step's processes meet: its first node, on a port derived from the job id (the
    same in every task), unless JAX_COORDINATOR_PORT names one; the task's rank among them; and
    every GPU Slurm gave the task. JAX alone would keep one GPU per task (the task's local id),
    while a node runs one process with all its GPUs here: the fast links join them inside it."""
    port = os.environ.get("JAX_COORDINATOR_PORT") or str(61440 + int(os.environ["SLURM_JOB_ID"]) % 4096)
    settings = {"coordinator_address": f"{first_slurm_host(os.environ['SLURM_STEP_NODELIST'])}:{port}",
                "num_processes": int(os.environ["SLURM_NTASKS"]), "process_id": int(os.environ["SLURM_PROCID"])}
    settings.update(node_gpus())
    return settings


def node_gpus() -> dict:
    """local_device_ids naming every GPU this process may use: those CUDA_VISIBLE_DEVICES lists (CUDA
    numbers them from 0), or, for the one process of a node, every GPU the driver lists. JAX, on
    Slurm or Open MPI, would otherwise keep one GPU per process (its local rank)."""
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    alone = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0] == "1" \
        or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == "1"
    count = len(visible) if visible else len(list(Path("/proc/driver/nvidia/gpus").glob("*"))) if alone else 0
    return {"local_device_ids": list(range(count))} if count else {}


def wait_for_coordinator(address: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Returns once ``address`` (host:port) accepts a connection; ConfigError after ``timeout_s``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"mesh.coordinator_address must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(poll_s * 4, timeout_s)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"the coordinator {address} did not answer within {timeout_s:g} s ({error.strerror or error}): "
                    "start process 0 (it hosts the coordinator), check the address and that its port is open, "
                    "or raise mesh.connect_timeout_s") from None
            time.sleep(poll_s)


def start(config) -> str | None:
    """Starts jax.distributed as ``config`` (a MeshConfig) asks; returns the cluster's name, or
    None when the run stays one process. Must come before any other JAX call."""
    cluster = detected_cluster()
    explicit = config.coordinator_address is not None or config.num_processes is not None
    if config.distributed is False or (config.distributed == "auto" and cluster is None and not explicit):
        return None
    import jax

    # Slurm's are written out here, so its coordinator is probed like one given in the config.
    settings = slurm_settings() if cluster == "Slurm" else node_gpus() if cluster == "Open MPI" else {}
    settings.update({k: v for k, v in (("coordinator_address", config.coordinator_address),
                                       ("num_processes", config.num_processes),
                                       ("process_id", config.process_id)) if v is not None})
    if "coordinator_address" in settings and settings.get("process_id") != 0:  # process 0 hosts it
        wait_for_coordinator(settings["coordinator_address"], config.connect_timeout_s)
    try:
        jax.distributed.initialize(**settings, initialization_timeout=config.connect_timeout_s)
    except (ValueError, RuntimeError) as error:  # JAX's own words on what it could not find
        raise ConfigError(f"could not start the multi-host runtime ({' '.join(str(error).split())[:300]}): "
                          "set mesh.coordinator_address, mesh.num_processes and mesh.process_id, or "
                          "mesh.distributed=false for one process") from None
    return cluster or "the coordinator in mesh.coordinator_address"
