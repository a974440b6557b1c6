"""Devices: multi-host start-up, the (data, fsdp, tensor) mesh and global batches."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from model import make_mesh
from model.sharding import logical_to_spec
from recipes.train.config import MeshConfig
from recipes.errors import ConfigError



def init_distributed(config: MeshConfig) -> None:
    """jax.distributed.initialize when the config asks for it (before any other JAX call)."""
    if not config.distributed:
        return
    kwargs = {k: v for k, v in (("coordinator_address", config.coordinator_address),
                                ("num_processes", config.num_processes),
                                ("process_id", config.process_id)) if v is not None}
    jax.distributed.initialize(**kwargs)


def build_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The config's mesh over ``devices`` (default: every visible device; a compile check passes
    a TPU slice's devices)."""
    devices = jax.devices() if devices is None else list(devices)
    if config.devices is not None:
        if config.devices > len(devices):
            raise ConfigError(f"mesh.devices={config.devices} but only {len(devices)} devices are visible")
        devices = devices[: config.devices]
    try:
        return make_mesh(config.data, config.fsdp, config.tensor, devices=devices)
    except ValueError as error:
        raise ConfigError(f"{error}. Set mesh.data, mesh.fsdp and mesh.tensor so that their product is "
                         f"the device count ({len(devices)}); one of them may be -1") from None


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token windows placed as the model's sharding rules place its ("batch", "seq") activations."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), mesh=mesh))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: the product of the mesh axes its rule uses."""
    rows = batch_sharding(mesh).spec[0]
    axes = () if rows is None else (rows,) if isinstance(rows, str) else rows
    return int(np.prod([mesh.shape[a] for a in axes]))


def check_batch(global_batch: int, micro_batch: int, mesh: Mesh, what: str = "data.micro_batch") -> None:
    shards = batch_shards(mesh)
    if micro_batch % shards:
        raise ConfigError(
            f"{what}={micro_batch} sequences do not split over the {shards} batch shards of the mesh "
            f"(data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple of {shards}")
    if global_batch % jax.process_count():
        raise ConfigError(f"the global batch {global_batch} does not split over {jax.process_count()} processes")


def global_batch_array(local_BxLp1: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows -> one global array; no process ever holds the whole batch."""
    rows = local_BxLp1.shape[0] * jax.process_count()
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh), local_BxLp1, (rows, *local_BxLp1.shape[1:]))


def describe(mesh: Mesh) -> dict:
    return {name: int(size) for name, size in mesh.shape.items()}
