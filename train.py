"""Train a GPT model from a YAML recipe; any config key (listed below) can be set on the command line.

    python train.py
    python train.py --config gpt2_small_celo2 --dry-run
    python train.py --config shakespeare_celo2 --train.steps=50 --optimizer.lr=1e-3 --train.out_dir=runs/short

--config takes a path or a NAME in configs/; without it the default recipe trains (minutes on a CPU).
train.out_dir is the run directory: it receives the resolved config, the optimizer's routing table,
metrics.jsonl and the checkpoints, and rerunning into it resumes from its latest checkpoint.
SIGTERM or Ctrl-C saves a checkpoint and exits cleanly.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import jax

from recipes import messages
from recipes.train import config as config_lib
from recipes.train import cluster
from recipes.train import mesh as mesh_lib
from recipes.train.build import build_program
from recipes.train.cli import add_config_help
from recipes.train.dry_run import dry_run_report
from recipes.train.health import NonFiniteError  # noqa: F401  (part of this module's interface)
from recipes.train.report import sample_text
from recipes.train.run_dir import open_run_dir
from recipes.train.trainer import TrainData, Trainer

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "shakespeare_celo2.yaml"  # a small GPT on the bundled corpus, minutes on a CPU


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, add_help=False)
    add_config_help(parser, lambda: config_lib.Config)
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
    cluster.start(config.mesh)  # before anything asks JAX which process this is
    messages.setup(process_index=jax.process_index())  # process 0 prints the messages
    for note in notes:
        logger.info(note)
    # Everything is built from shapes first; parameters are allocated only when training.
    # A dry run needs no Celo2 weights on disk: a placeholder of the right shapes stands in.
    program = build_program(config, shapes_only=args.dry_run)
    if args.dry_run:
        report = dry_run_report(config, program.routing, program.state_abstract, program.mesh)
        logger.info(program.routing.format())
        print(json.dumps(report), flush=True)
        return report

    data = TrainData.open(config, program)
    with open_run_dir(program) as run_dir:
        logger.info(program.routing.format())
        logger.info(f"mesh {mesh_lib.describe_levels(program.mesh, config.mesh)} on {program.mesh.size} "
                    f"{jax.devices()[0].device_kind} device(s), {jax.process_count()} process(es); "
                    f"{config.tokens_per_step:,} tokens/step ({config.data.global_batch} x {config.seq_len}, "
                    f"{program.micro_batches} micro-batch(es)), {config.train.steps:,} steps")
        trainer = Trainer(program, data, run_dir)
        summary = trainer.run()

    if trainer.state is not None:  # it trained: the closing lines
        for line in trainer.closing_lines(summary, time.perf_counter() - began):
            logger.info(line)
        if config.sample.max_new_tokens and jax.process_count() == 1:
            logger.info(f"--- a sample ({config.sample.max_new_tokens} new tokens, temperature "
                        f"{config.sample.temperature:g}) ---\n{sample_text(config, trainer.state['params'])}")
    return summary


if __name__ == "__main__":
    from recipes.train.cli import exit_after_training

    exit_after_training(main)
