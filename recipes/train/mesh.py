"""Devices: the two-level (data, fsdp, tensor) mesh and global batches (the multi-host start is recipes.train.cluster)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from model import make_mesh
from model.sharding import logical_to_spec, spec_axes
from recipes.train.config import MeshConfig
from model.config_base import ConfigError


def granules(devices) -> list[list]:
    """The devices grouped by what the slow links join: on TPUs the slices (a slice's chips share
    the fast interconnect whatever host they sit on), elsewhere the processes (one per host: a GPU
    node runs one process with all its GPUs)."""
    key = (lambda d: getattr(d, "slice_index", 0)) if _by_slice(devices) else (lambda d: d.process_index)
    groups: dict = {}
    for device in devices:
        groups.setdefault(key(device), []).append(device)
    return [groups[k] for k in sorted(groups)]


def mesh_levels(config: MeshConfig, devices) -> tuple[dict, dict]:
    """({axis: size} across hosts or slices, {axis: size} inside each), -1s resolved."""
    groups = granules(devices)
    outer = _resolve({"data": config.dcn_data, "fsdp": config.dcn_fsdp, "tensor": 1}, len(groups),
                     f"{len(groups)} {'slices' if _by_slice(devices) else 'hosts'}", "mesh.dcn_data x mesh.dcn_fsdp")
    inner = _resolve({"data": config.data, "fsdp": config.fsdp, "tensor": config.tensor}, len(groups[0]),
                     f"the {len(groups[0])} devices of each {'slice' if _by_slice(devices) else 'host'}",
                     "mesh.data x mesh.fsdp x mesh.tensor")
    return outer, inner


def _by_slice(devices) -> bool:
    return devices[0].platform == "tpu"


def _resolve(sizes: dict, count: int, what: str, product: str) -> dict:
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if -1 in sizes.values():
        if count % known:
            raise ConfigError(f"{product} cannot split {what}: {known} does not divide {count}")
        sizes = {k: count // known if v == -1 else v for k, v in sizes.items()}
    if int(np.prod(list(sizes.values()))) != count:
        raise ConfigError(f"{product} = {int(np.prod(list(sizes.values())))} must equal {what} ({count}); "
                          "one of them may be -1")
    return sizes


def build_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The config's mesh over ``devices`` (default: every visible device; a compile check passes
    a TPU slice's devices). Over several hosts or slices, device order follows the links: each
    mesh axis is (across, inside), with jax's hybrid device mesh."""
    devices = jax.devices() if devices is None else list(devices)
    if config.devices is not None:
        if config.devices > len(devices):
            raise ConfigError(f"mesh.devices={config.devices} but only {len(devices)} devices are visible")
        devices = devices[: config.devices]
    if len(granules(devices)) > 1:
        from jax.experimental import mesh_utils

        outer, inner = mesh_levels(config, devices)
        grid = mesh_utils.create_hybrid_device_mesh(
            tuple(inner.values()), tuple(outer.values()), devices, process_is_granule=not _by_slice(devices),
            allow_split_physical_axes=True)
        return Mesh(grid, tuple(inner), axis_types=(AxisType.Auto,) * 3)
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
    return int(np.prod([mesh.shape[a] for a in spec_axes(batch_sharding(mesh).spec[0])]))


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


def describe_levels(mesh: Mesh, config: MeshConfig) -> str:
    """'{'data': 2, 'fsdp': 4, 'tensor': 1}', plus how it splits when it spans hosts or slices:
    '... = across 2 hosts {data: 2} x inside each {fsdp: 4}'."""
    devices = list(mesh.devices.flat)
    if len(granules(devices)) == 1:
        return str(describe(mesh))
    outer, inner = mesh_levels(config, devices)
    unit = "slices" if _by_slice(devices) else "hosts"
    return (f"{describe(mesh)} = across {len(granules(devices))} {unit} {nontrivial_axes(outer)} x inside each "
            f"{nontrivial_axes(inner)}")


def nontrivial_axes(sizes: dict) -> str:
    """'{data: 2}': the axes of ``sizes`` over 1 (data alone when none is)."""
    kept = {k: v for k, v in sizes.items() if v > 1} or {"data": 1}
    return "{" + ", ".join(f"{k}: {v}" for k, v in kept.items()) + "}"
