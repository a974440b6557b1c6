"""The --dry-run report: sizes of a run, worked out from shapes alone (nothing allocated)."""
from __future__ import annotations

from jax.sharding import Mesh

from model import count_params
from recipes.train.config import Config
from recipes.train.mesh import describe, granules, mesh_levels
from recipes.optim.routing import RoutingTable
from recipes.train.shardings import bytes_per_device


def dry_run_report(config: Config, table: RoutingTable, state_abstract: dict, mesh: Mesh) -> dict:
    """Parameter counts (n_params_by_branch includes the vocab padding rows), tokens, mesh and
    the bytes each device holds for parameters and optimizer state (the largest shard)."""
    counts = count_params(config.model)
    return {
        "n_params": counts.total,
        "n_params_padded": counts.padded_total,
        "n_params_non_embedding": counts.non_embedding,
        "n_params_by_branch": {branch: t["count"] for branch, t in table.branches().items()},
        "tokens_per_step": config.tokens_per_step,
        "total_steps": config.train.steps,
        "total_tokens": config.tokens_per_step * config.train.steps,
        "micro_batches_per_step": config.data.micro_batches_per_step,
        "mesh": describe(mesh),
        "mesh_levels": _levels(config, mesh),
        "bytes_per_device": {
            "params": bytes_per_device(state_abstract["params"]),
            "opt_state": bytes_per_device(state_abstract["opt_state"]),
            "params_and_opt_state": bytes_per_device(state_abstract),
        },
    }


def _levels(config: Config, mesh: Mesh) -> dict:
    """How the mesh splits over the slow links (across hosts or slices) and the fast ones (inside)."""
    devices = list(mesh.devices.flat)
    across, inside = mesh_levels(config.mesh, devices) if len(granules(devices)) > 1 else \
        ({"data": 1, "fsdp": 1, "tensor": 1}, describe(mesh))
    return {"granules": len(granules(devices)), "across": across, "inside": inside}
