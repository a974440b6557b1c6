"""Meta-train Celo2 with PES.

    python scripts/metatrain.py --config configs/metatrain/smoke.yaml
    python scripts/metatrain.py --config configs/metatrain/smoke.yaml --metatrain.out_dir=runs/smoke_again

Any config key (listed below) can be set as --KEY=VALUE. Rerunning into an existing metatrain.out_dir
resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path


from recipes import messages
from recipes.train.cli import add_config_help, run_main
from data.cache import jax_cache_dir
from model.config_base import ConfigError
from recipes.metatrain.config import MetaTrainConfig
from recipes.metatrain.loop import MetaTrainer
from recipes.metatrain.xla_flags import allow_slow_collectives
from recipes.train.stop import StopRequest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    add_config_help(parser, lambda: MetaTrainConfig)
    parser.add_argument("--config", required=True, help="a YAML file, e.g. configs/metatrain/smoke.yaml")
    parser.add_argument("--compilation-cache", default=str(jax_cache_dir()),
                        help="JAX's persistent compilation cache (reruns and resumes skip most compiling; "
                        "default: %(default)s); '' disables")
    parser.add_argument("--cpu-devices", type=int, default=os.cpu_count(),
                        help="CPU devices the particles are split over, one thread each (default: every core)")
    args, overrides = parser.parse_known_args(argv)
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"unexpected argument {item!r}: overrides look like --metatrain.outer_steps=10")
    config = MetaTrainConfig.from_file(args.config, overrides)
    allow_slow_collectives()  # read when JAX starts
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    messages.setup()
    trainer = MetaTrainer(config)
    state = trainer.run()
    if trainer.stopped_by is not None:  # saved and resumable: exit as the signal would, for schedulers
        return 128 + int(trainer.stopped_by)
    print(f"done: outer step {int(state.step)}; theta at {Path(config.metatrain.out_dir) / 'theta.state'}", flush=True)
    return 0


if __name__ == "__main__":
    StopRequest.process_exits_after = True  # a stop for SIGTERM stays exit 143 however many follow
    exit_code = run_main(main)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # all is on disk: a late SIGTERM must not make the exit a death
    raise SystemExit(exit_code)
