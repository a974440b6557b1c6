"""The trainer's parts, in the order train.py uses them.

    config.py          one typed run config: sections as frozen dataclasses, load_config
                       (read through recipes.config_parsing)
    mesh.py            the device mesh, multi-host start-up, global batches from per-process rows
    build.py           the one build path: config -> mesh, abstract state, optimizer, jitted steps
    state.py           the train state (a plain dict): abstract and fresh
    shardings.py       where each state array lives: parameters by the model's rules, optimizer
                       state by its parameters
    step.py            the jitted train and eval steps
    trainer.py         the Trainer: restore or init, its hooks on the loop; TrainData (the loader)
    loop.py            the loop both trainers run: steps dispatched ahead of reading their
                       metrics, hooks registered with their cadence, the training clock
    hooks.py           what the loop does besides stepping: metrics rows and throughput,
                       evaluation and steps to target, trusted checkpoints, the summary
    health.py          the health guard: non-finite steps, loss spikes, which states may be saved
    run_dir.py         the run directory: what may be in it, its lock (open_run_dir), resume
                       checks (from the checkpoints' own records), config history, summary.json
    checkpoint.py      orbax checkpoints of the train state; write failures as one line
    run_params.py      a run's parameters for sampling and export (the trainer's fallback)
    stop.py            SIGTERM/SIGINT -> save and exit, a hook (meta-training stops the same way)
    metrics.py         metrics.jsonl (rows set aside, never deleted), W&B, the progress bar, MFU
    dry_run.py         sizes, tokens and bytes per device of a config, computed from shapes
    report.py          the closing lines a finished run prints, and its sample
    cli.py             how entry points end: a result, or one `error:` line and an exit code;
                       --help's list of config keys

Imports the optimizer library (recipes.optim); never imported by it.
"""
