"""Will a recipe fit a TPU slice? Compile its real train step for the slice, on this machine.

The program is train.py's own (recipes.train.build: mesh, micro-batches, remat, dtypes,
optimizer with a placeholder Celo2 theta of the right shapes), lowered for the slice's
devices as the TPU runtime describes them and compiled by the TPU compiler, which refuses
a program that does not fit the chip's memory. The compiled program gives the bytes per
device and the collectives; the step's FLOPs (and the optimizer update's share) come from
a lowering with its loops unrolled (step_cost), and give a compute-roofline step time and
MFU at the chip's peak.
"""
from __future__ import annotations

import dataclasses
import re
import threading
import time

import jax
import optax

from model import make_mesh
from recipes.experiments.hlo_collectives import collectives
from recipes.experiments.tpu_slices import GIB, Slice, slice_devices
from recipes.train.build import TrainProgram, build_program
from recipes.train.config import Config
from recipes.train.metrics import flops_per_token


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
    """Prints how long a compile has run, every ``every`` seconds, so a long one is seen to be alive."""

    def __init__(self, what: str, log, every: float = 15.0):
        self.what, self.log, self.every = what, log, every
        self._done = threading.Event()

    def __enter__(self):
        self.began = time.perf_counter()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        while not self._done.wait(self.every):
            self.log(f"  {self.what}: {time.perf_counter() - self.began:.0f} s")

    def __exit__(self, *exc):
        self._done.set()
        self.seconds = time.perf_counter() - self.began


def _cost(lowered_or_compiled) -> dict:
    cost = lowered_or_compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def step_cost(config: Config) -> dict:
    """FLOPs and bytes of one whole step, over all devices, and the optimizer's part.

    XLA's cost analysis counts a loop body once, and a step loops over layers and micro-batches;
    so the step is lowered (not compiled: seconds) for one host device with its layers unrolled
    and one micro-batch, and its cost scaled by the micro-batch count. Remat's recomputation is
    in the program, so it is counted. Bytes are those of the unfused program: an upper bound."""
    micro = config.data.global_batch // config.data.micro_batches_per_step
    single = dataclasses.replace(config, model=dataclasses.replace(config.model, unroll_layers=True),
                                 data=dataclasses.replace(config.data, global_batch=micro, micro_batch=None))
    host = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    program = build_program(single, mesh=host, shapes_only=True, diagnostics=False)
    micro_step = _cost(program.lower())
    update = _cost(_lowered_update(program))
    times = config.data.micro_batches_per_step
    return {key: times * (micro_step[key] - update[key]) + update[key] for key in micro_step} | \
        {f"optimizer_{key}": update[key] for key in update}


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


def check(config: Config, slice_: Slice, log=print) -> dict:
    """The report of one recipe on one slice; raises DoesNotFit when the compiler refuses it."""
    devices = slice_devices(slice_)
    program = build_program(config, devices=devices, shapes_only=True, diagnostics=False)
    n = len(devices)
    log(f"compiling the train step for {slice_.name} ({n} x {devices[0].device_kind}, "
        f"mesh {dict(program.mesh.shape)}, micro-batch {program.micro_batch} x {program.micro_batches})")
    with Heartbeat("compiling", log) as beat:
        try:
            compiled = program.compile()
        except Exception as error:  # the TPU compiler's refusal arrives as a runtime error
            refusal = _out_of_memory(error)
            if refusal is None:
                raise
            raise refusal from None
    memory = compiled.memory_analysis()
    per_device = {"argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
                  "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes,
                  "code": memory.generated_code_size_in_bytes}
    per_device["peak"] = (per_device["argument"] + per_device["output"] - per_device["alias"]
                          + per_device["temp"] + per_device["code"])
    hbm, chip = slice_.chip.hbm_bytes, slice_.chip
    with Heartbeat("counting the step's FLOPs", log):
        cost = step_cost(config)
    flops, traffic = cost["flops"] / n, cost["bytes_accessed"] / n  # per device, work split evenly
    compute_s, memory_s = flops / chip.peak_bf16_flops, traffic / chip.hbm_bytes_per_s
    model_flops = flops_per_token(config.model, config.seq_len) * config.tokens_per_step / n
    report = {
        "slice": slice_.name, "topology": slice_.topology_name, "devices": n, "device_kind": devices[0].device_kind,
        "mesh": {k: int(v) for k, v in program.mesh.shape.items()},
        "micro_batch": program.micro_batch, "micro_batches_per_step": program.micro_batches,
        "tokens_per_step": config.tokens_per_step, "remat": config.model.remat,
        "compute_dtype": config.model.compute_dtype, "optimizer": config.optimizer.name,
        "fits": per_device["peak"] <= hbm, "bytes_per_device": per_device, "hbm_bytes_per_device": hbm,
        "peak_share_of_hbm": per_device["peak"] / hbm,
        "step": {"flops_per_device": flops, "model_flops_per_device": model_flops,
                 "bytes_accessed_per_device_unfused": traffic},
        # Compute roofline: every FLOP at the chip's bf16 peak (collectives overlapped, memory not the
        # limit). The unfused bytes bound the memory side from above.
        "roofline": {"step_s": compute_s, "memory_s_upper_bound": memory_s,
                     "mfu": model_flops / (chip.peak_bf16_flops * compute_s) if compute_s else None,
                     "tokens_per_s": config.tokens_per_step / compute_s if compute_s else None},
        "optimizer_share": {"flops": cost["optimizer_flops"] / cost["flops"] if cost["flops"] else None,
                            "bytes_accessed": cost["optimizer_bytes_accessed"] / cost["bytes_accessed"]
                            if cost["bytes_accessed"] else None},
        "chip": {"kind": chip.kind, "hbm_bytes": hbm, "peak_bf16_flops": chip.peak_bf16_flops,
                 "hbm_bytes_per_s": chip.hbm_bytes_per_s, "source": chip.source},
        "collectives": collectives(compiled.as_text()),
        "compile_s": round(beat.seconds, 1),
    }
    return report


def _gib(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / GIB:.2f} GiB" if value >= GIB / 10 else f"{value / 2**20:.1f} MiB"


def markdown(recipe: str, report: dict) -> str:
    b, r, s = report["bytes_per_device"], report["roofline"], report["step"]
    lines = [f"# {recipe} on {report['slice']}", "",
             f"{'Fits' if report['fits'] else 'Does not fit'}: peak {_gib(b['peak'])} of {_gib(report['hbm_bytes_per_device'])} "
             f"per device ({report['peak_share_of_hbm']:.0%}); {report['devices']} x {report['device_kind']}, "
             f"mesh {report['mesh']}, micro-batch {report['micro_batch']} x {report['micro_batches_per_step']}, "
             f"remat {report['remat']}, {report['compute_dtype']} compute, optimizer {report['optimizer']}; "
             f"compiled in {report['compile_s']:.0f} s on this machine.", "",
             "| per device | bytes |", "|---|---|"]
    lines += [f"| {k} | {_gib(v)} |" for k, v in b.items()]
    o = report["optimizer_share"]
    lines += ["", f"Per step and device: {s['flops_per_device']:.3g} FLOPs ({s['model_flops_per_device']:.3g} of them "
              f"the model's 6N per token and attention; the rest is remat's recomputation and the optimizer). At the "
              f"chip's bf16 peak ({report['chip']['peak_bf16_flops'] / 1e12:.0f} TFLOP/s; {report['chip']['source']}) "
              f"that is {r['step_s'] * 1e3:.1f} ms a step, {r['tokens_per_s']:,.0f} tokens/s, projected MFU "
              f"{r['mfu']:.1%} (a compute roofline: collectives overlapped, memory traffic not the limit).",
              "", f"The optimizer's update: {o['flops']:.2%} of the step's FLOPs, {o['bytes_accessed']:.1%} of its "
              "(unfused) bytes.", ""]
    c = report["collectives"]
    lines += ["| collective | count per step | bytes per step and device |", "|---|---|---|"]
    lines += [f"| {k} | {v['count']:,} | {_gib(v['bytes'])} |" for k, v in c["per_step"].items()]
    if c["uncounted_loops"]:
        lines += ["", f"Loops counted once (trip count unread): {', '.join(c['uncounted_loops'])}"]
    return "\n".join(lines) + "\n"
