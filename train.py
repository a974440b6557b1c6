"""Train a GPT model: python train.py [--config NAME.yaml] [--section.key=value ...] [--dry-run]

A bare NAME resolves in configs/; without --config the default recipe trains. train.out_dir is
the run directory: it receives the resolved config, the optimizer's routing table,
metrics.jsonl and the checkpoints, and rerunning into it resumes from its latest checkpoint.
SIGTERM or Ctrl-C saves a checkpoint and exits cleanly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from recipes.train import config as config_lib
from recipes.train import mesh as mesh_lib
from recipes.train.build import build_program
from recipes.train.dry_run import dry_run_report
from recipes.train.health import NonFiniteError  # noqa: F401  (part of this module's interface)
from recipes.train.report import sample_text, summary_lines
from recipes.train.run_dir import open_run_dir
from recipes.train.trainer import TrainData, Trainer, log0

DEFAULT_RECIPE = "shakespeare_celo2.yaml"  # a small GPT on the bundled corpus, minutes on a CPU


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", default=DEFAULT_RECIPE,
                        help=f"YAML recipe: a path or a name in configs/ (default: {DEFAULT_RECIPE})")
    parser.add_argument("--dry-run", action="store_true",
                        help="build everything abstractly, print sizes as JSON (last line) and exit")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
    began = time.perf_counter()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    notes = []
    config = config_lib.load_config(args.config, overrides, notes)
    mesh_lib.init_distributed(config.mesh)  # before anything asks JAX which process this is
    for note in notes:
        log0(note)
    # Everything is built from shapes first; parameters are allocated only when training.
    # A dry run needs no Celo2 weights on disk: a placeholder of the right shapes stands in.
    program = build_program(config, shapes_only=args.dry_run)
    if args.dry_run:
        report = dry_run_report(config, program.routing, program.state_abstract, program.mesh)
        log0(program.routing.format())
        print(json.dumps(report), flush=True)
        return report

    data = TrainData.open(config, program)
    with open_run_dir(program, log=log0) as run_dir:
        log0(program.routing.format())
        log0(f"mesh {mesh_lib.describe_levels(program.mesh, config.mesh)} on {program.mesh.size} {jax.devices()[0].device_kind} "
             f"device(s), {jax.process_count()} process(es); {config.tokens_per_step:,} tokens/step "
             f"({config.data.global_batch} x {config.seq_len}, {program.micro_batches} micro-batch(es)), "
             f"{config.train.steps:,} steps")
        trainer = Trainer(program, data, run_dir)
        summary = trainer.run()

    if jax.process_index() == 0 and trainer.state is not None:  # it trained: the closing lines
        tokens = (summary["step"] - summary["start_step"]) * config.tokens_per_step
        for line in summary_lines(summary, trainer.evaluation.first_loss, tokens, time.perf_counter() - began,
                                  run_dir / "checkpoints", config.sample.prompt):
            print(line, flush=True)
        if config.sample.max_new_tokens and jax.process_count() == 1:
            print(f"--- a sample ({config.sample.max_new_tokens} new tokens, temperature "
                  f"{config.sample.temperature:g}) ---\n{sample_text(config, trainer.state['params'])}", flush=True)
    return summary


if __name__ == "__main__":
    from recipes.train.cli import exit_after_training

    exit_after_training(main)
