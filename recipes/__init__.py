"""How a model is trained, in subpackages along the data flow; each imports only those above it.

    errors.py     ConfigError, raised by every layer for a setting that cannot be used, and
                  check_number for values that are not config keys
    config_parsing.py  YAML files with base:, --section.key=value overrides, and the config
                  classes (pydantic dataclasses) of the model, optimizer, trainer and meta-training,
                  with the one translation of their refusals into ConfigError messages
    files.py      atomic file writes, checkpoint-directory rotation, moving damaged ones aside
    platforms.py  the CPU alone where no accelerator is present, so installed plugins stay quiet
    optim/        Celo2, its theta format and shipped weights, routing, the optimizer harness,
                  schedules, diagnostics
    train/        config, mesh, train state and step, run directory, checkpoints, stop handling,
                  metrics, dry run, report, exit codes (train.py is its loop)
    experiments/  sweeps, their tables and plots, benchmarks, the device check
    metatrain/    PES meta-training of Celo2, on the trainer's config reading, locking and stop handling
    celo2.py      `from recipes.celo2 import scale_by_celo2, load_checkpoint`, the release's import path

Imports point one way: optim <- train <- experiments; metatrain uses optim and train.
"""
from recipes.platforms import use_cpu_without_accelerators

use_cpu_without_accelerators()  # before JAX starts a backend: no probes of absent accelerators
