"""How a model is trained, in subpackages along the data flow; each imports only those above it.

    config_parsing.py  YAML files with base:, --section.key=value overrides merged by OmegaConf into
                  the config classes (model.config_base: pydantic dataclasses whose refusals it words;
                  its ConfigError is what every layer raises for a setting that cannot be used)
    recipe_yaml.py  YAML as recipes and overrides are read: strict and bounded
    platforms.py  the CPU alone where no accelerator is present, so installed plugins stay quiet
    messages.py   the one handler of the project's logging: process 0 prints each message
                  (entry points call setup)
    optim/        Celo2, its theta format and shipped weights, routing, the optimizer harness,
                  schedules, diagnostics
    train/        config, mesh, train state and step, the loop and its hooks (both trainers'), run
                  directory, checkpoints, stop handling, metrics, dry run, report, exit codes
    experiments/  sweeps, their tables and plots, benchmarks, the device check
    metatrain/    PES meta-training of Celo2, on the trainer's config reading, loop, locking and stop
                  handling
    celo2.py      `from recipes.celo2 import scale_by_celo2, load_checkpoint`, the release's import path

Imports point one way: optim <- train <- experiments; metatrain uses optim and train.
"""
from recipes.platforms import use_cpu_without_accelerators

use_cpu_without_accelerators()  # before JAX starts a backend: no probes of absent accelerators
