"""One prepared measurement of an accelerator: throughput, optimizer cost, memory and numerics.

Sections, each written to the report as soon as it is done (a cut-short run
keeps what it measured):
  memory     gpt3xl_celo2 with remat for a few steps at the largest micro-batch
             that fits: peak device memory against the dry run's estimate
  training   GPT-2 small in bf16 compute with fp32 parameters, AdamW, Muon and
             Celo2 at the largest micro-batch that fits all three: tokens/s, MFU,
             forward+backward against optimizer time
  updates    one optimizer update on GPT-2 small and GPT-3 XL hidden matrices
  numerics   the default recipe's first steps in fp32 on the accelerator against
             the same steps on the host CPU
Before them, on a GPU, the GPU's target description (XLA's GpuTargetConfigProto, as
text, which XLA's GPU compiler dumps beside a program it compiles) is saved beside the
report, so that programs can later be compiled for this GPU on a machine without one;
after them, that file is read back into a compile-only topology and a small program
compiled for it.
``tiny`` runs the same code on small shapes (a CPU, a test).
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import re
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from recipes.train import config as config_lib
from recipes.experiments.benchmarks import GPT2_SMALL_BLOCK, GPT3_XL_BLOCK, TrainingSetup, time_training, time_updates, \
    training_losses
from recipes.optim.theta import theta_from_source
from recipes.train.dry_run import dry_run_report
from recipes.train.metrics import json_safe
from recipes.train.shardings import bytes_per_device

THETA = "celo2_lm"  # the default recipe's shipped weights: the authors' cannot be fetched offline
TOKENS_PER_STEP = 524_288  # GPT-2's 0.5M-token step, for Celo2's optimizer share
NUMERICS_TOLERANCE = 1e-3  # largest |loss difference| over the steps compared, fp32 with full-precision matmuls
MEMORY_HEADROOM = 0.92  # a micro-batch fits when XLA's estimate is under this share of device memory
TARGET_CONFIG_FILE = "gpu_target_config.txtpb"  # beside device_check.json, on a GPU
GPU_COMPILER_DUMP = "gpu_target_config.pbtxt"  # how XLA's GPU compiler names the description it dumps

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section runs; FULL on an accelerator, TINY anywhere in a few minutes."""

    train_overrides: tuple[str, ...]
    train_micro_batches: tuple[int, ...]
    memory_overrides: tuple[str, ...]
    memory_micro_batches: tuple[int, ...]
    memory_steps: int
    update_workloads: dict
    numerics_overrides: tuple[str, ...]
    numerics_steps: int
    repeats: int


FULL = Sizes(
    train_overrides=(),
    train_micro_batches=(64, 48, 32, 24, 16, 8),
    memory_overrides=(),
    memory_micro_batches=(32, 16, 8, 4, 2, 1),
    memory_steps=3,
    update_workloads={"gpt2_small x12": [(12, *s) for s in GPT2_SMALL_BLOCK],
                      "gpt3_xl x24": [(24, *s) for s in GPT3_XL_BLOCK]},
    numerics_overrides=(),
    numerics_steps=8,
    repeats=5,
)
TINY_SHAPES = [(64, 192), (64, 64), (64, 256), (256, 64)]
TINY = Sizes(  # a 512-token vocabulary where tokens are synthetic: GPT-2's would dominate the time
    train_overrides=("--model.size=tiny", "--data.seq_len=32", "--model.vocab_size=512"),
    train_micro_batches=(16, 8),
    memory_overrides=("--model.size=tiny", "--data.seq_len=32", "--model.vocab_size=512"),
    memory_micro_batches=(4, 2),
    memory_steps=2,
    update_workloads={"tiny x2": [(2, *s) for s in TINY_SHAPES]},
    numerics_overrides=("--model.size=tiny", "--data.seq_len=32", "--data.global_batch=8"),
    numerics_steps=3,
    repeats=1,
)


def device_memory_limit() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("bytes_limit")


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _config(name: str, overrides, micro_batch: int):
    args = [*overrides, f"--data.global_batch={micro_batch}", f"--data.micro_batch={micro_batch}",
            f"--optimizer.theta={THETA}", "--mesh.devices=1"]
    return config_lib.load_config(name, args)


def largest_fitting(configs: Callable[[int], list], micro_batches,
                    estimate: bool = True) -> tuple[int, int, TrainingSetup | None]:
    """The largest micro-batch whose every config's compiled train step fits device memory, and
    XLA's estimate of its bytes. Without memory statistics (CPUs) the first candidate is taken,
    and compiled for its estimate only if ``estimate``. Also returns the setup that was compiled."""
    limit = device_memory_limit()
    if limit is None and not estimate:
        return micro_batches[0], 0, None
    for micro in micro_batches:
        # Compiling is the slow part: judge by the config whose optimizer state is largest.
        setups = [TrainingSetup(config) for config in configs(micro)]
        largest = max(setups, key=lambda t: bytes_per_device(t.program.state_abstract))
        # The allocator's share (the generated code is not in peak_bytes_in_use); 0 without an analysis.
        worst = largest.compiled_bytes().get("buffers", 0)
        if limit is None or worst <= MEMORY_HEADROOM * limit:
            logger.info(f"  micro-batch {micro}: XLA estimates {worst / 2**30:.2f} GiB for "
                        f"{largest.config.optimizer.name}" + ("" if limit is None else f" of {limit / 2**30:.1f} GiB"))
            return micro, worst, largest
        logger.info(f"  micro-batch {micro} does not fit ({worst / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB)")
    raise RuntimeError(f"none of the micro-batches {micro_batches} fits device memory")


def check_memory(sizes: Sizes) -> dict:
    micro, estimate, setup = largest_fitting(lambda m: [_config("gpt3xl_celo2", sizes.memory_overrides, m)],
                                              sizes.memory_micro_batches)
    config = setup.config
    report = dry_run_report(config, setup.program.routing, setup.program.state_abstract, setup.mesh)
    state = setup.init()
    began = time.perf_counter()
    with jax.set_mesh(setup.mesh):
        for step in range(sizes.memory_steps):
            state, metrics = setup.compiled_step()(state, setup.batch(step))  # the step just measured
        loss = float(metrics["loss"])
    seconds = time.perf_counter() - began
    del state
    peak = peak_memory()
    dry = report["bytes_per_device"]["params_and_opt_state"]
    return {"recipe": "gpt3xl_celo2", "remat": config.model.remat, "micro_batch": micro,
            "seq_len": config.seq_len, "n_params": report["n_params"], "steps": sizes.memory_steps,
            "seconds": round(seconds, 3), "last_loss": loss, "peak_bytes": peak,
            "dry_run_params_and_opt_state_bytes": dry, "xla_estimate_bytes": estimate,
            "peak_over_params_and_opt_state": None if peak is None else peak / dry,
            "peak_over_xla_estimate": None if peak is None else peak / estimate}


def check_training(sizes: Sizes) -> dict:
    names = ("adamw", "muon", "celo2")
    micro, _, _ = largest_fitting(lambda m: [_config(f"gpt2_small_{n}", sizes.train_overrides, m) for n in names],
                                  sizes.train_micro_batches, estimate=False)
    rows, fwd_bwd = {}, None
    for name in names:
        config = _config(f"gpt2_small_{name}", sizes.train_overrides, micro)
        setup = TrainingSetup(config)
        timed = time_training(setup, sizes.repeats, fwd_bwd)
        fwd_bwd = timed["seconds"]["fwd_bwd"]  # the same model and batch for every optimizer
        s = timed["seconds"]
        # The optimizer's share of a 0.5M-token step: forward+backward scale with tokens, the update does not.
        fwd_bwd_at_target = s["fwd_bwd"] * TOKENS_PER_STEP / config.tokens_per_step
        timed["optimizer_share_of_0.5M_token_step"] = s["optimizer"] / (fwd_bwd_at_target + s["optimizer"])
        timed["compute_dtype"] = config.model.compute_dtype
        timed["projection"] = projected_step(setup, s["step"])
        rows[name] = timed
        logger.info(f"  {name}: {timed['tokens_per_s']:,.0f} tokens/s"
                    + (f", MFU {timed['mfu']:.1%}" if timed["mfu"] is not None else "")
                    + f", fwd+bwd {s['fwd_bwd'] * 1e3:.1f} ms, optimizer {s['optimizer'] * 1e3:.1f} ms")
        gc.collect()
    return {"micro_batch": micro, "seq_len": config.seq_len, "optimizers": rows,
            "celo2/muon_step": rows["celo2"]["seconds"]["step"] / rows["muon"]["seconds"]["step"]}


def projected_step(setup: TrainingSetup, measured_s: float) -> dict | None:
    """The compile check's projection of the step just timed (its own compiled program, this GPU's
    datasheet figures), and whether the measurement falls inside it; None off NVIDIA H100/H200."""
    from recipes.experiments.gpu_slices import GPUS
    from recipes.experiments.hlo_roofline import project

    kind = jax.devices()[0].device_kind.lower()
    chip = next((c for name, c in GPUS.items() if name in kind), None)
    if chip is None:
        return None
    report = project(setup.compiled_step().as_text(), peak_flops=chip.peak_bf16_flops,
                     memory_bytes_per_s=chip.hbm_bytes_per_s, link_bytes_per_s=None)
    low, high = report["step_s_range"]
    return {"step_s_range": [low, high], "measured_s": measured_s, "inside": low <= measured_s <= high,
            "measured_over_slow_end": measured_s / high, "kernels": report["kernels"],
            "heaviest": report["heaviest"][:8]}


def check_updates(sizes: Sizes) -> dict:
    theta = theta_from_source(THETA)
    out = {}
    for label, shapes in sizes.update_workloads.items():
        out[label] = time_updates(shapes, sizes.repeats, theta)
        out[label]["params"] = int(sum(np.prod(s) for s in shapes))
        logger.info(f"  {label}: " + ", ".join(f"{k} {v['ms']:.2f} ms" for k, v in out[label]["results"].items()))
        gc.collect()
    return out


def check_numerics(sizes: Sizes) -> dict:
    overrides = [*sizes.numerics_overrides, "--model.compute_dtype=float32", f"--optimizer.theta={THETA}",
                 "--mesh.devices=1"]
    config = config_lib.load_config("shakespeare_celo2", overrides)
    cpu = jax.devices("cpu")[0]
    with jax.default_matmul_precision("highest"):
        with jax.default_device(cpu):  # everything of the host run, constants included, on the CPU
            host = training_losses(config, sizes.numerics_steps, cpu)
        # On a CPU-only machine the "device" is the host itself: the same losses, not trained twice.
        same = jax.devices()[0] == cpu
        device = list(host) if same else training_losses(config, sizes.numerics_steps, jax.devices()[0])
    worst = float(np.max(np.abs(np.subtract(host, device))))
    return {"recipe": "shakespeare_celo2", "steps": sizes.numerics_steps, "cpu_losses": host,
            "device_losses": device, "device": jax.devices()[0].device_kind, "max_abs_difference": worst,
            "tolerance": NUMERICS_TOLERANCE, "within_tolerance": worst <= NUMERICS_TOLERANCE}


def target_description(device=None) -> tuple[str, str | None]:
    """The platform of ``device`` (default: the first) and, on a GPU, its target description: XLA's
    GpuTargetConfigProto in text format. XLA's GPU compiler writes the description it compiled for
    into the dump directory of every module it dumps (``<module>.gpu_target_config.pbtxt``), so a tiny
    program is compiled for the device with dumping on, into a temporary directory, and that file read.
    None on other platforms: their compilers write no such file."""
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    # A module name of its own: dump options are left out of the persistent compilation cache's key,
    # and a program loaded from that cache is not compiled, so it would dump nothing.
    name = f"gpu_target_probe_{uuid.uuid4().hex}"

    def probe(x):
        return x + 1

    probe.__name__ = probe.__qualname__ = name
    arg = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    with tempfile.TemporaryDirectory() as dump_dir:
        # Only this module is dumped: any other compiled meanwhile stays out of the directory.
        jax.jit(probe).lower(arg).compile(compiler_options={"xla_dump_to": dump_dir, "xla_dump_hlo_module_re": name})
        written = sorted(Path(dump_dir).glob(f"*{name}*.{GPU_COMPILER_DUMP}"))
        text = written[0].read_text() if written else None
    if text is None:
        if device.platform == "gpu":
            raise RuntimeError(f"XLA's GPU compiler wrote no *.{GPU_COMPILER_DUMP} into its dump directory")
        return device.platform, None
    # jax calls CUDA and ROCm devices "gpu"; a compile-only topology is asked for by the proto's own name.
    named = re.search(r'^platform_name:\s*"([^"]+)"', text, re.MULTILINE)
    return (named.group(1).lower() if named else device.platform), text


def save_target_description(out_dir: Path) -> dict:
    """Writes the GPU's target description to OUT/gpu_target_config.txtpb; what the report records of it."""
    began = time.perf_counter()
    try:
        platform, text = target_description()
    except Exception as error:  # recorded like a failed section; the sections still run
        logger.info(f"  failed: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:500]}",
                "wall_s": round(time.perf_counter() - began, 1)}
    if text is None:
        logger.info(f"  skipped: the {platform} backend has no GPU target description")
        return {"skipped": f"{platform} backend"}
    (out_dir / TARGET_CONFIG_FILE).write_text(text)
    found = re.search(r'device_description_str:\s*"([^"]*)"', text)
    # Text protos leave out fields at their default: an H200's minor version 0 is not written.
    capability = re.search(r"cuda_compute_capability\s*\{\s*major:\s*(\d+)(?:\s*minor:\s*(\d+))?", text)
    result = {"file": TARGET_CONFIG_FILE, "platform": platform, "bytes": len(text.encode()),
              "sha256": hashlib.sha256(text.encode()).hexdigest(),
              "device_description": found.group(1) if found else None,
              "compute_capability": f"{capability.group(1)}.{capability.group(2) or 0}" if capability else None,
              "wall_s": round(time.perf_counter() - began, 1)}
    logger.info(f"  saved {TARGET_CONFIG_FILE} ({result['bytes']:,} bytes, {result['device_description']}, "
                f"compute capability {result['compute_capability']})")
    return result


def compile_for_target(text: str, platform: str = "cuda") -> dict:
    """Builds a one-GPU compile-only topology from a saved target description, as a compile check
    would, and compiles a small program for it: proof that the saved file is enough."""
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    began = time.perf_counter()
    devices = topologies.get_topology_desc(platform=platform, topology="1x1x1", target_config=text).devices
    sharding = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    arg = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=sharding)
    jax.jit(lambda a: jnp.tanh(a @ a), out_shardings=sharding).lower(arg).compile()
    return {"devices": len(devices), "device_kind": devices[0].device_kind,
            "wall_s": round(time.perf_counter() - began, 1)}


SECTIONS = {"memory": check_memory, "training": check_training, "updates": check_updates,
            "numerics": check_numerics}


def run(out_dir: Path, tiny: bool, sections=tuple(SECTIONS)) -> dict:
    """Runs the sections in order, rewriting device_check.json and .md after each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    report = {"device": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
              "jax": jax.__version__, "mode": "tiny" if tiny else "full", "theta": THETA, "sections": {}}
    logger.info("[target description]")  # first, and written at once: cheap, and kept whatever happens later
    report["gpu_target_config"] = save_target_description(out_dir)
    write(out_dir, report)
    for name in sections:
        logger.info(f"[{name}]")
        began = time.perf_counter()
        try:
            result = SECTIONS[name](TINY if tiny else FULL)
            result["wall_s"] = round(time.perf_counter() - began, 1)
        except Exception as error:  # a failed section is recorded; the others still run
            result = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:500]}",
                      "traceback": traceback.format_exc(limit=8), "wall_s": round(time.perf_counter() - began, 1)}
            logger.info(f"  failed: {result['error']}")
        report["sections"][name] = result
        jax.clear_caches()
        gc.collect()
        write(out_dir, report)
    # Last, so that nothing measured is lost if this fails.
    target = report["gpu_target_config"]
    if "file" in target:
        logger.info("[target description read back]")
        try:
            target["compile_check"] = compile_for_target((out_dir / TARGET_CONFIG_FILE).read_text(),
                                                         target["platform"])
            logger.info(f"  compiled for {target['compile_check']['device_kind']} from {TARGET_CONFIG_FILE}")
        except Exception as error:
            target["compile_check"] = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"}
            logger.info(f"  failed: {target['compile_check']['error']}")
        write(out_dir, report)
    return report


def write(out_dir: Path, report: dict) -> None:
    (out_dir / "device_check.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False, default=float))
    (out_dir / "device_check.md").write_text(markdown(report))


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def _ratio(value, fmt="{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown(report: dict) -> str:
    s = report["sections"]
    lines = [f"Device check on {report['device']} ({report['platform']}, {report['mode']} shapes, jax "
             f"{report['jax']}, Celo2 theta `{report['theta']}`).", ""]
    target = report.get("gpu_target_config", {})
    if "file" in target:
        check = target.get("compile_check", {})
        lines += [f"GPU target description ({target['device_description']}, compute capability "
                  f"{target['compute_capability']}) saved as `{target['file']}`"
                  + (f"; a program compiled for it from that file alone ({check['device_kind']})." if "device_kind"
                     in check else f"; compiling for it from that file failed: {check['error']}" if "error" in check
                     else "."), ""]
    elif "error" in target:
        lines += [f"**GPU target description** failed: {target['error']}", ""]
    for name, result in s.items():
        if "error" in result:
            lines += [f"**{name}** failed: {result['error']}", ""]
    if "training" in s and "error" not in s["training"]:
        t = s["training"]
        lines += [f"GPT-2 small training, micro-batch {t['micro_batch']} x {t['seq_len']} tokens:", "",
                  "| optimizer | compute | tokens/s | MFU | step ms | fwd+bwd ms | optimizer ms | "
                  "optimizer share of a 0.5M-token step |", "|---|---|---|---|---|---|---|---|"]
        for name, r in t["optimizers"].items():
            sec = r["seconds"]
            lines.append(f"| {name} | {r['compute_dtype']} | {r['tokens_per_s']:,.0f} | "
                         f"{_ratio(r['mfu'], '{:.1%}')} | {sec['step'] * 1e3:.1f} | {sec['fwd_bwd'] * 1e3:.1f} | "
                         f"{sec['optimizer'] * 1e3:.1f} | {r['optimizer_share_of_0.5M_token_step']:.1%} |")
        lines += ["", f"Celo2/Muon whole step: {t['celo2/muon_step']:.2f}", ""]
    if "updates" in s and "error" not in s["updates"]:
        lines += ["One optimizer update on hidden matrices (ms):", "",
                  "| workload | parameters | AdamW | Muon | Celo2-base | Celo2 | Celo2-base/AdamW | Celo2/Muon |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, w in s["updates"].items():
            if not isinstance(w, dict) or "results" not in w:
                continue
            r = w["results"]
            lines.append(f"| {label} | {w['params']:,} | {r['adamw']['ms']:.2f} | {r['muon']['ms']:.2f} | "
                         f"{r['celo2_base']['ms']:.2f} | {r['celo2']['ms']:.2f} | "
                         f"{w['ratios']['celo2_base/adamw']:.2f} | {w['ratios']['celo2/muon']:.2f} |")
        lines.append("")
    if "memory" in s and "error" not in s["memory"]:
        m = s["memory"]
        lines += [f"gpt3xl_celo2 ({m['n_params']:,} parameters, remat {m['remat']}), micro-batch {m['micro_batch']} x "
                  f"{m['seq_len']}, {m['steps']} steps: peak device memory {_gib(m['peak_bytes'])} (since the "
                  f"process started); the dry run's parameters + optimizer state "
                  f"{_gib(m['dry_run_params_and_opt_state_bytes'])}, XLA's estimate of the whole step "
                  f"{_gib(m['xla_estimate_bytes'])}; peak/(parameters + optimizer state) "
                  f"{_ratio(m['peak_over_params_and_opt_state'])}, peak/XLA estimate "
                  f"{_ratio(m['peak_over_xla_estimate'])}.", ""]
    if "numerics" in s and "error" not in s["numerics"]:
        n = s["numerics"]
        verdict = "within" if n["within_tolerance"] else "OUTSIDE"
        lines += [f"Numerics: {n['steps']} fp32 steps of {n['recipe']} on {n['device']} against the CPU: largest "
                  f"loss difference {n['max_abs_difference']:.2e}, {verdict} the tolerance {n['tolerance']:g}.", ""]
    return "\n".join(lines)
