"""Logical axis names -> mesh axes. The only place that decides how tensors are laid out.

Parameters and activations are annotated with logical names in the model code; the
rules below map those names onto a mesh with axes ('data', 'fsdp', 'tensor').
Weights shard their embed dim over 'fsdp' while activations shard their batch over
('data', 'fsdp'), so activation names differ from parameter names ('act_*').
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

LOGICAL_RULES: dict[str, MeshAxes] = {
    # parameters
    "layers": None,  # the scan axis stays whole on every device
    "vocab": "tensor",
    "position": None,
    "embed": "fsdp",
    "heads": "tensor",  # any dim made of n_head x head_dim (q/k/v columns, proj rows)
    "mlp": "tensor",
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_head_dim": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 to take the remaining devices.

    Axes are Auto: with Explicit axes (jax.make_mesh's default) the embedding gather
    on sharded token ids fails to type-check.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh "
                             f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                         f"devices, have {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | jax.sharding.AbstractMesh | None = None) -> PartitionSpec:
    """PartitionSpec for a tensor annotated with logical axis names.

    With a mesh, mesh axes the mesh lacks are dropped, and so are mesh axes that do
    not divide the dim (that dim is then replicated rather than unevenly split).
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    spec, used = [], set()
    manual = set() if mesh is None else set(mesh.manual_axes)
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        axes = spec_axes(LOGICAL_RULES[name])
        if mesh is not None:  # axes under shard_map's manual control are already split off
            axes = tuple(a for a in axes if a in mesh.shape and a not in manual)
            if shape is not None:
                # Keep the longest prefix of mesh axes whose product divides the dim.
                while axes and shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
                    axes = axes[:-1]
        if used & set(axes):
            raise ValueError(f"mesh axes {axes} used twice in {tuple(logical_axes)}")
        used |= set(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_partition_specs(params, mesh: Mesh | None = None):
    """PartitionSpec for every parameter of an nnx.State (concrete or abstract).

    Returns the same structure as `params`, each Variable holding its PartitionSpec.
    """
    def spec(v: nnx.Variable):
        axes = v.get_metadata().get("out_sharding")
        if axes is None:
            raise ValueError(f"parameter of shape {v.shape} has no logical axis annotation")
        return v.replace(logical_to_spec(axes, v.shape, mesh))
    return jax.tree.map(spec, params, is_leaf=_is_variable)


def param_shardings(params, mesh: Mesh):
    """NamedSharding for every parameter (same structure as `params`): for jax.device_put
    or jit in_/out_shardings."""
    specs = param_partition_specs(params, mesh)
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, v.get_value())), specs,
                        is_leaf=_is_variable)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; a no-op unless a mesh is set (jax.set_mesh) with
    axes not under shard_map's manual control."""
    if manual_or_no_mesh():
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, jax.sharding.get_abstract_mesh()))


def free_axes(mesh: Mesh | jax.sharding.AbstractMesh) -> set[str]:
    """The mesh axes no shard_map being traced has made manual: those a nested shard_map may take."""
    return set(mesh.axis_names) - set(mesh.manual_axes)


def spec_axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, an axis or a tuple of axes) as a tuple of axes."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def manual_or_no_mesh() -> bool:
    """True when tracing with no mesh set, or inside shard_map where every axis is Manual: each
    shard is then already placed, and code runs on it as on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.are_all_axes_manual
