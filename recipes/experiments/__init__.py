"""Tools that run or measure many trainings: sweeps, their tables and plots, benchmarks.

    sweeps.py        grids of runs (each an ordinary run directory), results.csv/json, W&B sweeps
    sweep_tables.py  reading a sweep's results: best points, the markdown summary
    sweep_plots.py   heatmaps over (learning rate, weight decay) and loss against learning rate
    benchmarks.py    timing optimizer updates and training steps
    device_check.py  the one-command measurement of an accelerator (scripts/device_check.py)
    torch_reference.py  a PyTorch GPT of the same architecture: the CPU speed anchor (scripts/bench_anchor.py)

Builds on recipes.train and recipes.optim; nothing there imports this package.
"""
