"""The optimizer library: Celo2 and the harness that applies it beside AdamW and Muon.

    celo2.py        scale_by_celo2, the learned update rule as an optax transformation
    theta.py        Celo2's weights (theta): the theta.state format, loading, saving, named thetas
    weights/        thetas meta-trained by this project, shipped with the package
    config.py       OptimizerConfig, ScheduleConfig, RoutingConfig: the optimizer's settings
    routing.py      which parameter goes to which partition (celo2/muon or adamw), the routing table
    optimizers.py   build_optimizer: one optax.partition from an OptimizerConfig
    schedules.py    learning-rate schedules
    diagnostics.py  per-partition update statistics logged during training

Nothing here imports the trainer (recipes.train).
"""
