"""Learning-rate schedules built from ScheduleConfig on optax's schedule pieces.

Each schedule is a function step -> LR with the warmup first (linear from 0 to
the peak, so step ``warmup_steps`` is the first at the peak) and the kind's
shape after it; past ``total_steps`` the final value holds.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from recipes.optim.config import ScheduleConfig


def resolve_total_steps(config: ScheduleConfig, total_steps: int | None = None) -> int | None:
    """The config's total_steps, else the trainer's; refuses a missing one where the kind needs it."""
    total = config.total_steps if config.total_steps is not None else total_steps
    if total is None:
        if config.kind == "constant":
            return None
        raise ValueError(
            f"schedule kind {config.kind!r} needs the run length: set schedule.total_steps "
            "or pass total_steps (the trainer's step count) to the optimizer builder"
        )
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total!r}")
    config.fitting_warmup(total)  # refuses a warmup (and WSD decay) longer than the run
    return total


def _one_minus_sqrt(peak: float, floor: float, steps: int) -> optax.Schedule:
    def schedule(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
        return floor + (peak - floor) * (1.0 - jnp.sqrt(progress))

    return schedule


def _decay(shape: str, peak: float, floor: float, steps: int) -> optax.Schedule:
    """From peak to floor over ``steps`` (steps counted from the start of the decay)."""
    if steps <= 0:
        return optax.constant_schedule(floor)
    if shape == "linear":
        return optax.linear_schedule(peak, floor, steps)
    if shape == "cosine":
        return optax.cosine_decay_schedule(peak, steps, alpha=floor / peak if peak else 0.0)
    return _one_minus_sqrt(peak, floor, steps)


def _after_warmup(config: ScheduleConfig, peak: float, total: int | None) -> optax.Schedule:
    floor = config.min_lr_ratio * peak
    if config.kind == "constant":
        return optax.constant_schedule(peak)
    remaining = total - config.warmup_steps
    if config.kind in ("cosine", "linear"):
        return _decay(config.kind, peak, floor, remaining)
    # wsd: hold the peak, then decay over the last decay_fraction of the run.
    decay_steps = config.decay_steps(total)
    stable_steps = remaining - decay_steps
    decay = _decay(config.decay_shape, peak, floor, decay_steps)
    if stable_steps == 0:
        return decay
    return optax.join_schedules([optax.constant_schedule(peak), decay], [stable_steps])


def make_schedule(config: ScheduleConfig, peak_lr: float, total_steps: int | None = None) -> optax.Schedule:
    """step -> learning rate for a peak LR; ``total_steps`` is used when the config has none."""
    if isinstance(peak_lr, bool) or not isinstance(peak_lr, (int, float)) or peak_lr < 0:
        raise ValueError(f"peak learning rate must be a number >= 0, got {peak_lr!r}")
    peak = float(peak_lr)
    total = resolve_total_steps(config, total_steps)
    after = _after_warmup(config, peak, total)
    if config.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])
