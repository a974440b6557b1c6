"""Will a recipe fit a TPU slice or a GPU node? Compile its real train step for it, on this machine.

The program is train.py's own (recipes.train.build: mesh, micro-batches, remat, dtypes,
optimizer with a placeholder Celo2 theta of the right shapes), lowered for the slice's
devices as the TPU runtime (or, for GPUs, a shipped target description) describes them and
compiled by that platform's compiler, which refuses a program that does not fit the chip's
memory. The compiled program gives the bytes per device, the collectives, the library kernels
chosen, and a step time projected kernel by kernel (recipes.experiments.hlo_roofline): a range
in ms, tokens/s and MFU that a measurement can contradict.

Several TPU slices compile as one program for all their devices, on the trainer's own two-level
mesh (recipes.train.mesh.build_mesh: by default data parallel across slices, FSDP inside). Its
collectives are split by the links they cross: inside a slice (ICI) or between slices (DCN),
each level at its own bandwidth in the projection.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time

import jax
import optax

from model import make_mesh
from recipes.experiments.benchmarks import compiled_memory
from recipes.experiments.gpu_slices import cuda_missing, gpu_devices, is_gpu
from recipes.experiments.hlo_collectives import LEVELS, collectives, custom_calls, partitions
from recipes.experiments.hlo_roofline import project
from recipes.experiments.tpu_slices import (DCN_ASSUMED, GIB, Slice, runtime_missing,
                                            slice_devices)
from recipes.train.build import TrainProgram, build_program
from recipes.train.config import Config
from recipes.train.mesh import describe_levels, granules, mesh_levels, nontrivial_axes
from recipes.train.metrics import flops_per_token

logger = logging.getLogger(__name__)


def compiler_missing(slice_: Slice) -> str | None:
    """None when this machine can compile for the slice, else what to install."""
    return cuda_missing() if is_gpu(slice_.name) else runtime_missing()


def topology_devices(slice_: Slice):
    return gpu_devices(slice_) if is_gpu(slice_.name) else slice_devices(slice_)


class DoesNotFit(Exception):
    """The compiler refused the program for want of device memory."""

    def __init__(self, needed: int | None, available: int | None, message: str):
        super().__init__(message)
        self.needed, self.available = needed, available


_SIZE = re.compile(r"\(?(\d+(?:\.\d+)?)([KMGT])\)?")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(error: Exception) -> DoesNotFit | None:
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    sizes = [int(float(v) * _UNITS[u]) for v, u in _SIZE.findall(text.split("exceeds", 1)[0][-80:] + " " +
                                                                  text.split("exceeds", 1)[-1][:80])]
    needed, available = (sizes[0], sizes[-1]) if len(sizes) >= 2 else (None, None)
    return DoesNotFit(needed, available, " ".join(text.split())[:300])


class Heartbeat:
    """Says how long a compile has run, every ``every`` seconds, so a long one is seen to be alive."""

    def __init__(self, what: str, every: float = 15.0):
        self.what, self.every = what, every
        self._done = threading.Event()

    def __enter__(self):
        self.began = time.perf_counter()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        while not self._done.wait(self.every):
            logger.info(f"  {self.what}: {time.perf_counter() - self.began:.0f} s")

    def __exit__(self, *exc):
        self._done.set()
        self.seconds = time.perf_counter() - self.began


def _cost(lowered_or_compiled) -> dict:
    cost = lowered_or_compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def optimizer_cost(config: Config) -> dict:
    """FLOPs and bytes of the optimizer's update over the whole model (lowered for one host device:
    seconds, nothing compiled)."""
    host = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    single = dataclasses.replace(config, data=dataclasses.replace(config.data, global_batch=config.data.micro_batch
                                                                  or config.data.global_batch, micro_batch=None))
    return _cost(_lowered_update(build_program(single, mesh=host, shapes_only=True, diagnostics=False)))


def _lowered_update(program: TrainProgram):
    """The optimizer's update alone, lowered (gradients laid out like parameters)."""
    tx, sh = program.tx, program.shardings

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    abstract = program.state_abstract
    jitted = jax.jit(update, in_shardings=(sh["params"], sh["opt_state"], sh["params"]),
                     out_shardings=(sh["params"], sh["opt_state"]), donate_argnums=(0, 1))
    with jax.set_mesh(program.mesh):
        return jitted.lower(abstract["params"], abstract["opt_state"], abstract["params"])


def granule_map(hlo_text: str, mesh) -> list[int] | None:
    """Partition id -> slice (or host) of a program over all the mesh's devices: ids are positions in
    the mesh's device order. None for a program of one slice's devices (a TPU multi-slice program:
    what crosses slices are its host transfers) or when the devices are one granule."""
    devices = list(mesh.devices.flat)
    groups = granules(devices)
    if len(groups) == 1 or partitions(hlo_text) != len(devices):
        return None
    index = {d.id: g for g, members in enumerate(groups) for d in members}
    return [index[d.id] for d in devices]


def check(config: Config, slice_: Slice) -> dict:
    """The report of one recipe on one slice (or several); raises DoesNotFit when the compiler refuses it."""
    devices = topology_devices(slice_)
    program = build_program(config, devices=devices, shapes_only=True, diagnostics=False)
    n = len(devices)
    logger.info(f"compiling the train step for {slice_.label} ({n} x {devices[0].device_kind}, "
                f"mesh {describe_levels(program.mesh, config.mesh)}, micro-batch {program.micro_batch} x "
                f"{program.micro_batches})")
    with Heartbeat("compiling") as beat:
        try:
            compiled = program.compile()
        except Exception as error:  # the TPU compiler's refusal arrives as a runtime error
            refusal = _out_of_memory(error)
            if refusal is None:
                raise
            raise refusal from None
    hlo = compiled.as_text()
    per_device = compiled_memory(compiled)
    del per_device["buffers"]  # the report's figures: the parts, and their peak with the code
    hbm, chip = slice_.chip.hbm_bytes, slice_.chip
    granule_of = granule_map(hlo, program.mesh)
    with Heartbeat("projecting the step's time"):
        projection = project(hlo, peak_flops=chip.peak_bf16_flops, memory_bytes_per_s=chip.hbm_bytes_per_s,
                             link_bytes_per_s=chip.link_bytes_per_s or None,
                             dcn_bytes_per_s=chip.dcn_bytes_per_s or None, granule_of=granule_of)
        update = optimizer_cost(config)
    across, inside = mesh_levels(config.mesh, devices) if len(granules(devices)) > 1 else ({}, {})
    model_flops = flops_per_token(config.model, config.seq_len) * config.tokens_per_step / n
    fast, slow = projection["step_s_range"]
    report = {
        "slice": slice_.name, "slices": slice_.slices, "topology": slice_.topology_name, "devices": n,
        "device_kind": devices[0].device_kind,
        "mesh": {k: int(v) for k, v in program.mesh.shape.items()},
        # Over several slices each mesh axis is (across slices) x (inside each).
        "mesh_levels": {"across": across, "inside": inside} if across else None,
        "micro_batch": program.micro_batch, "micro_batches_per_step": program.micro_batches,
        "tokens_per_step": config.tokens_per_step, "train_steps": config.train.steps, "remat": config.model.remat,
        "compute_dtype": config.model.compute_dtype, "optimizer": config.optimizer.name,
        "fits": per_device["peak"] <= hbm, "bytes_per_device": per_device, "hbm_bytes_per_device": hbm,
        "peak_share_of_hbm": per_device["peak"] / hbm,
        # What the compiled program does per device: its kernels' matmul FLOPs and memory traffic, each
        # loop counted as many times as it runs (recipes.experiments.hlo_roofline).
        "step": {"flops_per_device": projection["flops"], "model_flops_per_device": model_flops,
                 "bytes_per_device": projection["bytes"], "link_bytes_per_device": projection["link_bytes"],
                 "link_bytes_per_device_by_level": projection["link_bytes_by_level"],
                 "kernel_launches": projection["kernels"]},
        # Fast end: every kernel at its roofline, collectives hidden; slow end: each kernel's compute and
        # memory one after the other, collectives exposed. Real kernels below peak land above the range.
        "projection": {"step_s_range": [fast, slow], "collectives_s": projection["collectives_s"],
                       "collectives_s_by_level": projection["collectives_s_by_level"],
                       "tokens_per_s_range": [config.tokens_per_step / slow, config.tokens_per_step / fast],
                       "mfu_range": [model_flops / (chip.peak_bf16_flops * slow),
                                     model_flops / (chip.peak_bf16_flops * fast)],
                       "by_kind": projection["by_kind"], "heaviest": projection["heaviest"]},
        "optimizer_share": {"flops": update["flops"] / n / projection["flops"] if projection["flops"] else None,
                            "bytes_accessed": update["bytes_accessed"] / n / projection["bytes"]
                            if projection["bytes"] else None},
        "chip": {"kind": chip.kind, "hbm_bytes": hbm, "peak_bf16_flops": chip.peak_bf16_flops,
                 "hbm_bytes_per_s": chip.hbm_bytes_per_s, "link_bytes_per_s": chip.link_bytes_per_s,
                 "dcn_bytes_per_s": chip.dcn_bytes_per_s, "dcn_assumed": chip.kind in DCN_ASSUMED,
                 "source": chip.source},
        # Bytes per step and device by kind, and by level: inside a slice (ici) or between slices (dcn).
        "collectives": collectives(hlo, granule_of),
        # Library kernels the compiler chose (cuDNN attention on GPUs, for one), by call target.
        "custom_calls": custom_calls(hlo),
        "compile_s": round(beat.seconds, 1),
    }
    return report


def _gib(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / GIB:.2f} GiB" if value >= GIB / 10 else f"{value / 2**20:.1f} MiB"


def markdown(recipe: str, report: dict) -> str:
    b, s = report["bytes_per_device"], report["step"]
    slices = report.get("slices", 1)
    label = report["slice"] if slices == 1 else f"{slices} x {report['slice']}"
    mesh = report["mesh"]
    if report.get("mesh_levels"):
        levels = report["mesh_levels"]
        mesh = f"{mesh} (across slices {nontrivial_axes(levels['across'])} x inside each {nontrivial_axes(levels['inside'])})"
    lines = [f"# {recipe} on {label}", "",
             f"{'Fits' if report['fits'] else 'Does not fit'}: peak {_gib(b['peak'])} of {_gib(report['hbm_bytes_per_device'])} "
             f"per device ({report['peak_share_of_hbm']:.0%}); {report['devices']} x {report['device_kind']}, "
             f"mesh {mesh}, micro-batch {report['micro_batch']} x {report['micro_batches_per_step']}, "
             f"remat {report['remat']}, {report['compute_dtype']} compute, optimizer {report['optimizer']}; "
             f"compiled in {report['compile_s']:.0f} s on this machine.", "",
             "| per device | bytes |", "|---|---|"]
    lines += [f"| {k} | {_gib(v)} |" for k, v in b.items()]
    o, p = report["optimizer_share"], report["projection"]
    (fast, slow), (tok_slow, tok_fast), (mfu_slow, mfu_fast) = p["step_s_range"], p["tokens_per_s_range"], p["mfu_range"]
    chip = report["chip"]
    by_level = p.get("collectives_s_by_level", {})
    dcn = ""
    if slices > 1:
        dcn = (f"; between slices {chip['dcn_bytes_per_s'] * 8 / 1e9:,.0f} Gbit/s DCN per chip"
               f"{' (assumed: no published figure)' if chip.get('dcn_assumed') else ''}")
    split = ""
    if by_level.get("dcn"):
        links = s["link_bytes_per_device_by_level"]
        split = (f": {links['ici'] / 1e9:,.2f} GB inside slices ({by_level['ici'] * 1e3:,.1f} ms), "
                 f"{links['dcn'] / 1e9:,.2f} GB between them ({by_level['dcn'] * 1e3:,.1f} ms)")
    lines += ["", f"Projected step: {fast * 1e3:,.1f} to {slow * 1e3:,.1f} ms, {tok_slow:,.0f} to {tok_fast:,.0f} tokens/s, "
              f"MFU {mfu_slow:.1%} to {mfu_fast:.1%}. Per device the compiled program runs {s['kernel_launches']:,} kernels: "
              f"{s['flops_per_device']:.3g} FLOPs in matmuls ({s['model_flops_per_device']:.3g} the model's 6N per token "
              f"and attention), {s['bytes_per_device'] / 1e9:,.1f} GB of memory traffic, "
              f"{s['link_bytes_per_device'] / 1e9:,.2f} GB over the links ({p['collectives_s'] * 1e3:,.1f} ms if none "
              f"of it overlaps{split}). Chip: {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
              f"{chip['hbm_bytes_per_s'] / 1e9:,.0f} GB/s memory, {chip['link_bytes_per_s'] / 1e9:,.0f} GB/s links"
              f"{dcn} ({chip['source']}). Fast end: every kernel at its roofline and collectives hidden; slow end: "
              "compute and memory of each kernel in turn, collectives exposed; kernels below peak land above it.",
              "", "| kernels | launches | time at roofline |", "|---|---|---|"]
    lines += [f"| {kind} | {v['launches']:,} | {v['best_s'] * 1e3:,.1f} ms |" for kind, v in list(p["by_kind"].items())[:8]]
    lines += ["", f"The optimizer's update: {o['flops']:.2%} of the step's FLOPs, {o['bytes_accessed']:.1%} of its "
              "memory traffic.", ""]
    c = report["collectives"]
    levels = c.get("by_level")
    lines += ["| collective | count per step | bytes per step and device | inside a slice or node "
              "| between slices (DCN) |", "|---|---|---|---|---|"]
    for k, v in c["per_step"].items():
        split = " | ".join(_gib(levels[k][lv]) for lv in LEVELS) if levels else "n/a | n/a"
        lines.append(f"| {k} | {v['count']:,} | {_gib(v['bytes'])} | {split} |")
    if levels:
        totals = c["level_totals"]
        lines.append(f"| all | {sum(v['count'] for v in c['per_step'].values()):,} | "
                     f"{_gib(sum(totals.values()))} | {_gib(totals['ici'])} | {_gib(totals['dcn'])} |")
    if report.get("custom_calls"):
        lines += ["", "Library kernels: " + ", ".join(f"`{k}` x {v:,}" for k, v in report["custom_calls"].items())]
    if c["uncounted_loops"]:
        lines += ["", f"Loops counted once (trip count unread): {', '.join(c['uncounted_loops'])}"]
    return "\n".join(lines) + "\n"
