"""One loop for both trainers (train.py's and meta-training's): it dispatches steps and calls the
hooks registered with it.

    hooks = Hooks()
    hooks.add(write_row, every=10, last=True, metrics=True)
    hooks.add(evaluate, every=100, last=True, after_metrics=True)
    hooks.add(save, at_end=True)
    info = Loop(train_step, hooks, Clock()).run(state, start, last, batches)

Each hook is called with one StepInfo: the step (a count of steps done), the state after it, its
metrics once read, the clock and the run's last step; a hook may ask the loop to stop
(info.stop(reason)). A hook is called

    every=N         after each step that is a multiple of N; with last=True after the last too
    at_start        once, before the first step (info.step is the start)
    on_stop         when a hook asked to stop: the rest of that step's hooks are skipped
    at_end          once the loop is over, however it ended (unless by an exception)

A step's metrics stay on the device until read. Metrics hooks (metrics=True) are called once they
are: one step late, after the next step is dispatched, so the device never waits on the host; at
once when a hook of the same step comes after_metrics, and when the loop stops or ends.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax


class Clock:
    """Training wall time: from the end of the first, compiling step (start()), time inside
    paused() blocks left out, plus ``before`` (earlier invocations'). lap() gives the time since
    the last lap, paused time left out too: what throughput divides by."""

    def __init__(self, before: float = 0.0):
        self.before, self._paused = before, 0.0
        self._origin = self._lap = (time.perf_counter(), 0.0)  # (time, paused so far) at each mark

    def start(self) -> None:
        self._origin = (time.perf_counter(), self._paused)

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - began

    def _since(self, mark: tuple[float, float]) -> float:
        return time.perf_counter() - mark[0] - (self._paused - mark[1])

    def training_time(self) -> float:
        return self.before + self._since(self._origin)

    def lap(self) -> float:
        seconds, self._lap = self._since(self._lap), (time.perf_counter(), self._paused)
        return seconds


@dataclasses.dataclass
class StepInfo:
    step: int  # steps done
    state: Any  # the state after them
    clock: Clock
    last: int  # the step the run ends at unless stopped
    device_metrics: Any = None  # as the step returned them
    metrics: Any = None  # on the host, once read
    stop_reason: str | None = None

    def read(self):
        """The step's metrics on the host (read once)."""
        if self.metrics is None and self.device_metrics is not None:
            self.metrics = jax.device_get(self.device_metrics)
        return self.metrics

    def stop(self, reason: str) -> None:
        """Ends the loop after this hook (its metrics hooks, then the on_stop and at_end ones)."""
        self.stop_reason = reason


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], Any]
    every: int | None = None
    last: bool = False
    at_start: bool = False
    on_stop: bool = False
    at_end: bool = False
    metrics: bool = False
    after_metrics: bool = False

    def due(self, info: StepInfo) -> bool:
        return (bool(self.every) and info.step % self.every == 0) or (self.last and info.step == info.last)


class Hooks:
    """The hooks of one run, called in the order they were added."""

    def __init__(self):
        self._hooks: list[Hook] = []

    def add(self, fn: Callable[[StepInfo], Any], every: int | None = None, **when) -> None:
        """``when``: last, at_start, on_stop, at_end, metrics, after_metrics (see the module)."""
        self._hooks.append(Hook(fn, every, **when))

    def call(self, info: StepInfo, when: str) -> None:
        """The hooks flagged ``when`` (at_start, on_stop or at_end)."""
        for hook in self._hooks:
            if getattr(hook, when):
                hook.fn(info)

    def metric_hooks(self, info: StepInfo) -> list[Hook]:
        return [hook for hook in self._hooks if hook.metrics and hook.due(info)]

    def step_hooks(self, info: StepInfo) -> list[Hook]:
        return [hook for hook in self._hooks if not hook.metrics and hook.due(info)]


class Loop:
    def __init__(self, step: Callable[[Any, Any], tuple[Any, Any]], hooks: Hooks, clock: Clock | None = None):
        """``step(state, item) -> (state, metrics)``, one item of the loop's inputs per step."""
        self.step, self.hooks, self.clock = step, hooks, clock or Clock()

    def run(self, state, start: int, last: int, inputs: Iterable) -> StepInfo:
        """Steps from ``start``, one per item of ``inputs`` (through the run's ``last`` step at most),
        until they end or a hook stops the loop; returns the last step's StepInfo."""
        info = StepInfo(start, state, self.clock, last)
        self.hooks.call(info, "at_start")
        unread = None  # the step whose metrics are still on the device
        for item in inputs if info.stop_reason is None else ():
            state, metrics = self.step(info.state, item)  # dispatched before the last step is read
            info = StepInfo(info.step + 1, state, self.clock, last, metrics)
            if info.step == start + 1:  # compiling is not training
                jax.block_until_ready(metrics)
                self.clock.start()
            self._read(unread)
            unread = info
            for hook in self.hooks.step_hooks(info):
                if hook.after_metrics:
                    unread = self._read(unread)
                hook.fn(info)
                if info.stop_reason is not None:
                    break
            if info.stop_reason is not None:
                unread = self._read(unread)
                self.hooks.call(info, "on_stop")
                break
        self._read(unread)
        self.hooks.call(info, "at_end")
        return info

    def _read(self, info: StepInfo | None) -> None:
        """Reads the metrics of ``info``'s step (if any is left unread) and calls its metrics hooks;
        returns None, what is left unread then."""
        if info is None:
            return None
        info.read()
        for hook in self.hooks.metric_hooks(info):
            hook.fn(info)
        return None
