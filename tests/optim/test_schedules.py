"""Learning-rate schedules: values at chosen steps, run-length resolution, refused configs."""
import math
import re

import jax
import numpy as np
import pytest

from recipes.optim.config import OptimizerConfig, ScheduleConfig
from recipes.optim.optimizers import learning_rate_schedules
from recipes.optim.schedules import make_schedule


def values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def check(config, peak, expected: dict, total_steps=None):
    schedule = make_schedule(config, peak, total_steps)
    np.testing.assert_allclose(values(schedule, list(expected)), list(expected.values()), rtol=1e-6, atol=1e-9)


def test_cosine_warmup_then_cosine_to_floor():
    config = ScheduleConfig(kind="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    cos = lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))  # noqa: E731
    check(config, 2.0, {0: 0.0, 5: 1.0, 10: 2.0, 35: 2 * cos(0.25), 60: 2 * 0.55, 110: 0.2, 500: 0.2})


def test_linear_decay():
    config = ScheduleConfig(kind="linear", warmup_steps=10, total_steps=110, min_lr_ratio=0.0)
    check(config, 1.0, {0: 0.0, 10: 1.0, 35: 0.75, 60: 0.5, 110: 0.0, 200: 0.0})


def test_constant_needs_no_run_length():
    check(ScheduleConfig(kind="constant", warmup_steps=4), 3e-3, {0: 0.0, 1: 7.5e-4, 4: 3e-3, 10**6: 3e-3}, total_steps=100)
    check(ScheduleConfig(kind="constant"), 3e-3, {0: 3e-3, 10**6: 3e-3})


def test_no_warmup_starts_at_peak():
    check(ScheduleConfig(kind="cosine", total_steps=100, min_lr_ratio=0.0), 1.0, {0: 1.0, 50: 0.5, 100: 0.0})


@pytest.mark.parametrize("shape, at_90", [("linear", 0.55), ("cosine", 0.55), ("1-sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.5)))])
def test_wsd_warmup_stable_decay(shape, at_90):
    # 100 steps: warmup 10, stable to 80, decay over the last 20% to 0.1 * peak.
    config = ScheduleConfig(kind="wsd", warmup_steps=10, total_steps=100, decay_fraction=0.2,
                            min_lr_ratio=0.1, decay_shape=shape)
    check(config, 1.0, {0: 0.0, 5: 0.5, 10: 1.0, 50: 1.0, 80: 1.0, 90: at_90, 100: 0.1, 150: 0.1})


def test_run_length_from_trainer_and_config_precedence():
    config = ScheduleConfig(kind="linear", min_lr_ratio=0.0)
    check(config, 1.0, {50: 0.5, 100: 0.0}, total_steps=100)
    pinned = ScheduleConfig(kind="linear", min_lr_ratio=0.0, total_steps=200)
    check(pinned, 1.0, {100: 0.5, 200: 0.0}, total_steps=100)  # the config's own total wins


def test_schedule_is_jittable():
    schedule = make_schedule(ScheduleConfig(kind="wsd", warmup_steps=3, total_steps=20), 1.0)
    steps = np.arange(25)
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), values(schedule, steps), rtol=1e-6)


def test_branch_schedules_share_the_shape_with_their_own_peaks():
    sched = ScheduleConfig(kind="cosine", warmup_steps=2, total_steps=10)
    lrs = learning_rate_schedules(OptimizerConfig(name="celo2", lr=1e-2, adamw_lr_mult=0.3, schedule=sched))
    assert set(lrs) == {"celo2", "adamw"}
    for step in (1, 2, 6, 10):
        assert float(lrs["adamw"](step)) == pytest.approx(0.3 * float(lrs["celo2"](step)), rel=1e-6)
    own = learning_rate_schedules(OptimizerConfig(name="muon", lr=1e-2, adamw_lr=5e-4, schedule=sched))
    assert float(own["adamw"](2)) == pytest.approx(5e-4)
    assert set(learning_rate_schedules(OptimizerConfig(name="adamw", schedule=sched))) == {"adamw"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="step"), "schedule.kind must be one of"),
    (dict(warmup_steps=-1), "warmup_steps must be an int >= 0"),
    (dict(min_lr_ratio=1.5), "schedule.min_lr_ratio must be a number in [0, 1], got 1.5; the floor as a fraction of the peak"),
    (dict(decay_fraction=0.0), "schedule.decay_fraction must be a number in (0, 1], got 0.0"),
    (dict(decay_shape="exp"), "schedule.decay_shape must be one of ['linear', 'cosine', '1-sqrt'], got 'exp'"),
    (dict(total_steps=0), "schedule.total_steps must be an int > 0 or null, got 0"),
])
def test_bad_schedule_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ScheduleConfig(**kwargs)


def test_missing_or_short_run_length_is_refused():
    with pytest.raises(ValueError, match="set schedule.total_steps or pass total_steps"):
        make_schedule(ScheduleConfig(kind="cosine", warmup_steps=5), 1.0)
    with pytest.raises(ValueError, match="warmup_steps=5 exceeds total_steps=3"):
        make_schedule(ScheduleConfig(kind="cosine", warmup_steps=5), 1.0, total_steps=3)
    with pytest.raises(ValueError, match="warmup_steps=20 exceeds total_steps=10"):
        make_schedule(ScheduleConfig(warmup_steps=20, total_steps=10), 1.0)
    with pytest.raises(ValueError, match=re.escape("plus WSD decay (2 = decay_fraction 0.2 of 10)")):
        make_schedule(ScheduleConfig(kind="wsd", warmup_steps=9, total_steps=10, decay_fraction=0.2), 1.0)
    with pytest.raises(ValueError, match="peak learning rate must be a number >= 0"):
        make_schedule(ScheduleConfig(kind="constant"), -1.0)
