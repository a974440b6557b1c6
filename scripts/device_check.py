"""Measure an accelerator in one command: GPT-2 small throughput and MFU (AdamW, Muon, Celo2),
the optimizer updates on GPT-2 small and GPT-3 XL matrices, gpt3xl_celo2's peak memory against the
dry run, and fp32 losses on the device against the CPU.

    python scripts/device_check.py --out runs/device_check            # on a GPU/TPU: about 5-8 minutes
    python scripts/device_check.py --tiny --out runs/device_check     # the same code on small shapes

Writes OUT/device_check.json and OUT/device_check.md after every section, so a run cut short
keeps what it measured; on a GPU, first of all OUT/gpu_target_config.txtpb, the GPU's target
description, for compiling for it elsewhere. Without an accelerator the small shapes are used.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> dict:
    from recipes import messages
    from recipes.experiments.device_check import SECTIONS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/device_check"), help="where the JSON and table go")
    parser.add_argument("--tiny", action="store_true", help="small shapes (the default without an accelerator)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, in order (default {','.join(SECTIONS)})")
    parser.add_argument("--compilation-cache", default="cache/jax",
                        help="JAX's persistent compilation cache ('' disables it); repeated programs compile once")
    args = parser.parse_args(argv)
    messages.setup()  # each section's lines on stdout as it measures
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")

    import jax

    from recipes.experiments import device_check

    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    tiny = args.tiny or jax.default_backend() == "cpu"
    began = time.perf_counter()
    print(f"device check on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{'tiny' if tiny else 'full'} shapes -> {args.out}", flush=True)
    report = device_check.run(args.out, tiny, sections)
    print(f"\n{device_check.markdown(report)}\nwrote {args.out / 'device_check.json'} and "
          f"{args.out / 'device_check.md'} in {time.perf_counter() - began:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    result = main()
    parts = [*result["sections"].values(), result.get("gpu_target_config", {})]
    sys.exit(1 if any("error" in r for r in parts) else 0)  # each failure is in the report
