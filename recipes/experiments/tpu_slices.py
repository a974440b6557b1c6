"""TPU slices as users name them (v5e-8, v5p-32), their chips, and their devices without a TPU.

Cloud TPU names count chips for v5e and v6e (v5e-8: 8 chips) and TensorCores for v4 and
v5p (v5p-8: 4 chips of 2 cores each, which JAX shows as one device per chip). JAX's
topology names give the chip grid instead (v5e:2x4, v5p:2x2x1). Several slices of one shape
(multislice) join over the data-centre network (DCN), much slower than the chips' own links.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str
    hbm_bytes: int           # per chip
    peak_bf16_flops: float   # dense, per chip
    hbm_bytes_per_s: float
    cores_in_name: bool      # the slice name counts TensorCores (2 per chip), not chips
    grid_rank: int           # 2-D or 3-D chip grid
    source: str
    link_bytes_per_s: float = 0.0  # chip-to-chip interconnect per chip (ICI, NVLink)
    dcn_bytes_per_s: float = 0.0   # data-centre network per chip, between slices (0: none known)


GB, GIB = 10**9, 2**30
GBIT = 10**9 / 8
CHIPS = {
    # ICI per chip as the pages give it: 2,400 / 1,600 / 4,800 / 3,584 Gbit/s.
    # DCN per chip from the same pages: v5e a host's 2 x 100 Gbit/s NICs over its 8 chips (= 6.4 Tbit/s
    # per 256-chip pod), 25 Gbit/s; v5p "DCN bandwidth per chip 50 Gbps"; v6e 4 x 200 Gbit/s per
    # 8-chip host (= 25.6 Tbit/s per pod), 100 Gbit/s. v4's page gives none: assumed 25 Gbit/s, as v5e.
    "v4": Chip("v4", 32 * GIB, 275e12, 1200 * GB, True, 3, "https://cloud.google.com/tpu/docs/v4", 300 * GB,
               25 * GBIT),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819 * GB, False, 2, "https://cloud.google.com/tpu/docs/v5e", 200 * GB,
                25 * GBIT),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765 * GB, True, 3, "https://cloud.google.com/tpu/docs/v5p", 600 * GB,
                50 * GBIT),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640 * GB, False, 2, "https://cloud.google.com/tpu/docs/v6e", 448 * GB,
                100 * GBIT),
}
DCN_ASSUMED = {"v4"}  # no published figure: the report says so
# The chip grids Cloud TPU offers as single slices, smallest first.
GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8"}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str        # as users say it: v5p-32
    chip: Chip
    chips: int       # per slice
    grid: str        # JAX's chip grid: 2x2x4
    slices: int = 1  # several, joined by the data-centre network

    @property
    def topology_name(self) -> str:
        return f"{self.chip.kind}:{self.grid}"

    @property
    def label(self) -> str:
        """v5e-8, or 2xv5e-8 for two of them."""
        return self.name if self.slices == 1 else f"{self.slices}x{self.name}"

    @property
    def accelerator_type(self) -> str:
        """The runtime's own name (TPU_ACCELERATOR_TYPE): v5e is a 'v5litepod'."""
        return self.name.replace("v5e-", "v5litepod-")


def known_slices() -> list[str]:
    names = []
    for kind, chip in CHIPS.items():
        grids = GRIDS_3D if chip.grid_rank == 3 else GRIDS_2D
        names += [f"{kind}-{n * (2 if chip.cores_in_name else 1)}" for n in grids]
    return names


def parse_slice(name: str) -> Slice:
    """'v5e-8' -> Slice; ValueError naming the slices that exist otherwise."""
    kind, _, count = name.strip().lower().partition("-")
    chip = CHIPS.get(kind)
    if chip is None or not count.isdigit():
        raise ValueError(f"unknown TPU slice {name!r}: name one as Cloud TPU does, e.g. v5e-8, v5p-32, v6e-16, v4-8 "
                         f"(chips: {', '.join(CHIPS)})")
    number = int(count)
    chips = number // 2 if chip.cores_in_name else number
    grids = GRIDS_3D if chip.grid_rank == 3 else GRIDS_2D
    if chip.cores_in_name and number % 2 or chips not in grids:
        offered = ", ".join(n for n in known_slices() if n.startswith(kind + "-"))
        raise ValueError(f"{name} is not a single-slice shape of {kind}; offered: {offered}")
    return Slice(name.strip().lower(), chip, chips, grids[chips])


def quiet_tpu_environment() -> None:
    """What a TPU runtime needs to describe a slice on a machine without one: no metadata-server
    queries, this host as the only worker, and leave to load beside another process's runtime."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend stays the CPU


def runtime_missing() -> str | None:
    """None when the TPU runtime (libtpu) is installed, else how to install it."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return "the TPU runtime is not installed: pip install -e '.[tpu]' (libtpu, as jax pins it)"
    return None


def slice_devices(slice_: Slice):
    """The devices of the slice (of all its slices, each device with its slice_index), described by
    the TPU runtime; nothing runs on them, programs compile for them."""
    from jax.experimental import topologies

    os.environ["TPU_ACCELERATOR_TYPE"] = slice_.accelerator_type  # else the runtime warns it cannot tell
    options = {"chip_config_name": "megacore"} if slice_.chip.kind == "v4" else {}
    return topologies.get_topology_desc(topology_name=slice_.topology_name, platform="tpu",
                                        num_slices=slice_.slices, **options).devices
