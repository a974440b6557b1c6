"""Meta-training Celo2's weights with persistent evolution strategies (PES).

    python scripts/metatrain.py --config configs/metatrain/smoke.yaml

    config.py          the settings (read through recipes.config_parsing)
    pes.py             the PES estimator
    tasks/             the task families by kind (tasks/__init__.py: the registry, build_task)
      base.py          a task family's interface and the inner optimizer (the harness's)
      image.py         MLPs on 8x8 image sets (image_datasets.py reads them from installed packages)
      lm.py            small GPTs on a token corpus
    population.py      one family's particles
    fused.py           families of one shape trained as one population
    loop.py            the outer step and its hooks on the trainer's loop (recipes.train.loop), with
                       the trainer's run-directory lock, stop handling and metrics log
    checkpoint.py      save and resume (orbax, via the trainer's Checkpointer; official-format theta.state)
    evaluate.py        held-out evaluation of a theta against tuned baselines
    progress.py        meta-loss and validation loss against outer step
    ship.py            picking a snapshot by validation and shipping it under recipes/optim/weights/

Uses recipes.optim and recipes.train; neither imports it.
"""
