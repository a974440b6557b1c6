"""NVIDIA GPUs as compile targets (h100-1, h200-8): their figures and their devices without a GPU.

A GPU program compiles on any machine from a target description (gpu_targets/*.txtpb, XLA's
GpuTargetConfigProto) with jax's CUDA plugin, ptxas and libdevice installed (the [cuda]
extra); one node of 1 or 8 GPUs, NVLink between them.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from importlib import resources
from pathlib import Path

from recipes.experiments.tpu_slices import GB, Chip, Slice, known_slices, parse_slice

# Dense bf16 peaks and HBM figures from NVIDIA's datasheets (H100 SXM5, H200 SXM); memory as CUDA
# reports it (the target descriptions' device_memory_size).
_DATASHEET = ("NVIDIA H100/H200 SXM datasheets: 989 TFLOP/s dense bf16; 3.35 / 4.8 TB/s HBM; "
              "NVLink 900 GB/s (450 each way)")
NVLINK_BYTES_PER_S = 450 * GB  # per GPU and direction, NVLink 4
GPUS = {
    "h100": Chip("h100", 85_520_809_984, 989e12, 3350 * GB, False, 1, _DATASHEET, NVLINK_BYTES_PER_S),
    "h200": Chip("h200", 150_109_880_320, 989e12, 4800 * GB, False, 1, _DATASHEET, NVLINK_BYTES_PER_S),
}
GPUS_PER_NODE = (1, 8)


def is_gpu(name: str) -> bool:
    return name.strip().lower().partition("-")[0] in GPUS


def known_gpus() -> list[str]:
    return [f"{kind}-{n}" for kind in GPUS for n in GPUS_PER_NODE]


def parse_gpu(name: str) -> Slice:
    """'h200-8' -> a Slice of 8 GPUs on one node; ValueError naming the ones known otherwise."""
    kind, _, count = name.strip().lower().partition("-")
    if kind not in GPUS or not count.isdigit() or int(count) not in GPUS_PER_NODE:
        raise ValueError(f"unknown GPU topology {name!r}: name one of {', '.join(known_gpus())}")
    return Slice(name.strip().lower(), GPUS[kind], int(count), f"1x1x{count}")


def cuda_missing() -> str | None:
    """None when GPU programs can be compiled here, else how to install what is missing."""
    if importlib.util.find_spec("jax_plugins.xla_cuda13") is None:
        return "the CUDA plugin is not installed: pip install -e '.[cuda]'"
    nvidia = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (nvidia.submodule_search_locations or [])] if nvidia else []
    if not any((root / "cu13" / "bin" / "ptxas").exists() for root in roots):
        return "ptxas and libdevice are not installed: pip install -e '.[cuda]'"
    return None


def target_description(kind: str) -> str:
    return (resources.files("recipes.experiments.gpu_targets") / f"{kind}.txtpb").read_text()


def gpu_devices(slice_: Slice):
    """The node's GPUs as compile-only devices, from the shipped target description."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="cuda", topology=slice_.grid,
                                        target_config=target_description(slice_.chip.kind)).devices


def parse_topology(name: str, slices: int = 1) -> Slice:
    """A TPU slice (v5e-8, v5p-32), ``slices`` of them, or a GPU node (h100-1, h200-8); ValueError
    listing both otherwise."""
    if slices < 1:
        raise ValueError(f"--slices {slices}: name 1 or more slices")
    if slices > 1 and is_gpu(name):
        raise ValueError(f"--slices {slices} is for TPU slices; {name} is one GPU node")
    try:
        return parse_gpu(name) if is_gpu(name) else dataclasses.replace(parse_slice(name), slices=slices)
    except ValueError as error:
        if is_gpu(name) or name.strip().lower().partition("-")[0] in ("v4", "v5e", "v5p", "v6e"):
            raise
        raise ValueError(f"unknown topology {name!r}: name a TPU slice as Cloud TPU does (e.g. "
                         f"{', '.join(known_slices()[:3])}, ...) or a GPU node ({', '.join(known_gpus())})") from error
