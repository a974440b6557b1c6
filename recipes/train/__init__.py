"""The trainer's parts, in the order train.py uses them.

    config.py          one typed run config: sections as frozen dataclasses, load_config
                       (read through recipes.config_parsing)
    mesh.py            the device mesh, multi-host start-up, global batches from per-process rows
    step.py            the train state (a plain dict), its shardings, the jitted train and eval steps
    run_dir.py         the run directory: its lock, resume checks, config history, summary.json
    checkpoint.py      orbax checkpoints of the train state; parameters of a run for sampling/export
    stop.py            SIGTERM/SIGINT -> save and exit (meta-training stops the same way)
    metrics.py         metrics.jsonl, W&B, the progress bar, MFU, JSON-safe values
    dry_run.py         sizes, tokens and bytes per device of a config, computed from shapes
    report.py          the closing lines a finished run prints
    cli.py             how entry points end: a result, or one `error:` line and an exit code

Imports the optimizer library (recipes.optim); never imported by it.
"""
