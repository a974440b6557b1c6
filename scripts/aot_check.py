"""Will a recipe fit a TPU slice or a GPU node? Compile its real train step for it, with neither here.

    python scripts/aot_check.py --config gpt3xl_celo2.yaml --topology v5e-8 --data.micro_batch=8 --out runs/aot_v5e
    python scripts/aot_check.py --config gpt3xl_celo2.yaml --topology v5e-8 --slices 2
    python scripts/aot_check.py --config gpt2_small_adamw.yaml --topology h200-1

Any config key of the recipe (listed below) can be set as --KEY=VALUE.

Slices are named as Cloud TPU names them: v5e-8 and v6e-16 count chips, v4-8 and v5p-32
count TensorCores (two per chip). GPU nodes: h100-1, h100-8, h200-1, h200-8. --slices N compiles
for N such slices joined by the data-centre network, on the recipe's two-level mesh (mesh.dcn_data,
mesh.dcn_fsdp across slices; by default data parallel across them, FSDP inside).
Writes OUT/aot_check.json and OUT/aot_check.md: whether it fits, bytes per device against the
chip's memory, a step time projected kernel by kernel as a range (ms, tokens/s, MFU), the
heaviest kernels, the optimizer's share, the collectives per step (inside slices and between
them) and the library kernels chosen.
Exit codes: 0 fits, 2 does not fit (one line says what to change), 1 an error.
Needs the TPU runtime (pip install -e '.[tpu]') or, for GPUs, the CUDA compiler (pip install -e '.[cuda]').
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recipes import messages
from recipes.experiments.tpu_slices import quiet_tpu_environment
from recipes.train.cli import add_config_help

EXIT_FITS, EXIT_ERROR, EXIT_DOES_NOT_FIT = 0, 1, 2


def advice(config, slice_) -> str:
    """What to change when a recipe does not fit: the knobs that trade memory, in order of cost."""
    from recipes.experiments.gpu_slices import GPUS_PER_NODE, is_gpu
    from recipes.experiments.tpu_slices import GRIDS_2D, GRIDS_3D

    steps = []
    micro = config.data.micro_batch or config.data.global_batch
    if micro > 1:
        steps.append(f"lower data.micro_batch (now {micro}; the step's batch stays {config.data.global_batch})")
    if config.model.remat != "full":
        steps.append(f"set model.remat={'dots (or full)' if config.model.remat == 'none' else 'full'}")
    if is_gpu(slice_.name):
        bigger = [n for n in GPUS_PER_NODE if n > slice_.chips]
        if bigger:
            steps.append(f"or use more GPUs ({slice_.chip.kind}-{bigger[0]})")
        return ", ".join(steps)
    grids = GRIDS_3D if slice_.chip.grid_rank == 3 else GRIDS_2D
    bigger = [n for n in sorted(grids) if n > slice_.chips]
    if bigger:
        count = bigger[0] * (2 if slice_.chip.cores_in_name else 1)
        steps.append(f"or use more chips ({slice_.chip.kind}-{count})")
    return ", ".join(steps)


def _run_config_class() -> type:
    from recipes.train.config import Config

    return Config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, add_help=False)
    add_config_help(parser, _run_config_class)
    parser.add_argument("--config", required=True, help="YAML recipe: a path or a name in configs/")
    parser.add_argument("--topology", required=True,
                        help="a TPU slice as Cloud TPU names it (v5e-8, v5p-32, ...) or a GPU node (h100-1, h100-8, "
                             "h200-1, h200-8)")
    parser.add_argument("--slices", type=int, default=1,
                        help="how many such TPU slices, joined by the data-centre network (default 1)")
    parser.add_argument("--out", type=Path, help="where aot_check.json and .md go "
                        "(default runs/aot_check/RECIPE_SLICE, RECIPE_NxSLICE for several)")
    args, overrides = parser.parse_known_args(argv)
    messages.setup()  # the compile's progress on stdout

    quiet_tpu_environment()  # before JAX starts
    from recipes.experiments import aot_check
    from recipes.experiments.gpu_slices import parse_topology
    from recipes.train import config as config_lib
    from recipes.train.cli import one_line, ordinary_errors

    try:
        slice_ = parse_topology(args.topology, args.slices)
        missing = aot_check.compiler_missing(slice_)
        if missing:
            raise RuntimeError(missing)
        config = config_lib.load_config(args.config, overrides)
    except (ValueError, RuntimeError, *ordinary_errors()) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    recipe = Path(args.config).stem
    out = args.out or Path("runs/aot_check") / f"{recipe}_{slice_.label}"
    if out.exists() and not out.is_dir():  # said before minutes of compiling, not after
        print(f"error: --out {out} is a file; name a directory for aot_check.json and aot_check.md", file=sys.stderr)
        return EXIT_ERROR
    try:
        report = aot_check.check(config, slice_)
    except aot_check.DoesNotFit as refusal:
        needed = "more than it has" if refusal.needed is None else f"{refusal.needed / 2**30:.1f} GiB"
        out.mkdir(parents=True, exist_ok=True)
        (out / "aot_check.json").write_text(json.dumps(
            {"recipe": recipe, "slice": slice_.name, "slices": slice_.slices, "fits": False,
             "needed_bytes": refusal.needed, "available_bytes": refusal.available, "compiler": str(refusal)},
            indent=2) + "\n")
        print(does_not_fit(recipe, slice_, config, f"the compiler needs {needed}"), file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except (ValueError, *ordinary_errors()) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    out.mkdir(parents=True, exist_ok=True)
    report = {"recipe": recipe, **report}
    (out / "aot_check.json").write_text(json.dumps(report, indent=2) + "\n")
    text = aot_check.markdown(recipe, report)
    (out / "aot_check.md").write_text(text)
    print(text + f"\nwrote {out / 'aot_check.json'} and {out / 'aot_check.md'}", flush=True)
    if report["fits"]:
        return EXIT_FITS
    # Compiled, but its peak (arguments, outputs, temporaries, code) is over the chip's memory.
    peak = report["bytes_per_device"]["peak"] / 2**30
    print(does_not_fit(recipe, slice_, config, f"its compiled step peaks at {peak:.1f} GiB"), file=sys.stderr)
    return EXIT_DOES_NOT_FIT


def does_not_fit(recipe: str, slice_, config, needed: str) -> str:
    return (f"error: {recipe} does not fit {slice_.label}: {needed} per device, a {slice_.chip.kind} chip has "
            f"{slice_.chip.hbm_bytes / 2**30:.2f} GiB; {advice(config, slice_)}")


if __name__ == "__main__":
    sys.exit(main())
