"""What the training loop does besides stepping, one object per concern.

    WallClock           training wall time: evaluation and each invocation's compile excluded
    StepLog             a step's metrics on the host (read one step late): health guard,
                        metrics.jsonl rows, throughput and MFU, the progress bar
    Evaluation          the validation loss every eval.every steps, and when the target is reached
    TrustedCheckpoints  a checkpoint only of a state the health guard trusts
"""
from __future__ import annotations

import time

import jax
import numpy as np

from recipes.train import mesh as mesh_lib
from recipes.train import config as config_lib
from recipes.train.health import HealthGuard
from recipes.train.metrics import mfu


class WallClock:
    def __init__(self, before_resume: float = 0.0):
        self.before_resume = before_resume  # training time of earlier invocations, from metrics.jsonl
        self.restart()

    def restart(self) -> None:
        """Starts counting now (after the first, compiling step)."""
        self.start, self.paused = time.perf_counter(), 0.0

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def training_time(self) -> float:
        return self.before_resume + time.perf_counter() - self.start - self.paused


class StepLog:
    """The host side of each step: judged by the guard, averaged over logging.every steps into a
    metrics.jsonl row with throughput, shown on the progress bar."""

    def __init__(self, config, metrics_log, guard: HealthGuard, clock: WallClock, bar, devices, stop: int):
        self.config, self.metrics_log, self.guard, self.clock, self.bar = config, metrics_log, guard, clock, bar
        self.devices, self.stop = devices, stop
        self.last_loss = None
        self._start_window()

    def _start_window(self) -> None:
        self._window_start, self._window_paused, self._steps, self._losses = time.perf_counter(), 0.0, 0, []

    def exclude(self, seconds: float) -> None:
        """Time spent outside training (evaluation), left out of throughput."""
        self._window_paused += seconds

    def __call__(self, step: int, metrics) -> None:
        """Step ``step`` (a 1-based count of steps done) with its metrics, still on the device."""
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        if not self.guard.observe(step, loss, float(m["grad_norm"]), bool(m["finite"])):
            return
        self._steps += 1
        self._losses.append(loss)
        self.last_loss = loss
        if step % self.config.logging.every and step != self.stop:
            return
        elapsed = time.perf_counter() - self._window_start - self._window_paused
        tokens_per_step = self.config.tokens_per_step
        tokens_per_s = self._steps * tokens_per_step / max(elapsed, 1e-9)
        row = {"step": step, "loss": float(np.mean(self._losses)), "grad_norm": float(m["grad_norm"]),
               "lr": float(m["lr"]), "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s,
               "mfu": mfu(tokens_per_s, self.config.model, self.config.seq_len, self.devices),
               "skipped_steps": self.guard.skipped_steps, "wall_time_s": round(self.clock.training_time(), 3)}
        row.update({k: float(v) for k, v in m.get("diagnostics", {}).items()})
        self.metrics_log.log(row)
        postfix = {"loss": f"{row['loss']:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if row["mfu"] is not None:
            postfix["mfu"] = f"{row['mfu']:.1%}"
        self.bar.set_postfix(postfix, refresh=False)
        self._start_window()


class Evaluation:
    """Mean loss over the first eval.batches validation batches; records when it first reaches
    train.target_val_loss (tokens and training time to target, the sweeps' measure)."""

    def __init__(self, program, loader, batches: int, metrics_log, clock: WallClock, step_log: StepLog,
                 reached: dict | None, say):
        self.program, self.loader, self.batches, self.metrics_log = program, loader, batches, metrics_log
        self.clock, self.step_log, self.say = clock, step_log, say
        self.target = program.config.train.target_val_loss
        self.reached = reached  # target_step, target_tokens, target_wall_time_s once reached
        self.first_loss = self.last_loss = None

    def loss(self, params, batches: int | None = None) -> float:
        mesh = self.program.mesh
        losses = [self.program.eval_step(params, mesh_lib.global_batch_array(b, mesh))
                  for b in self.loader.val_batches(self.batches if batches is None else batches)]
        return float(np.mean(jax.device_get(losses)))

    def __call__(self, step: int, params) -> None:
        if self.batches == 0:
            return
        began = time.perf_counter()
        self.last_loss = self.loss(params)
        if self.first_loss is None:
            self.first_loss = self.last_loss
        self.metrics_log.log({"step": step, "val_loss": self.last_loss})
        self.say(f"step {step}: val loss {self.last_loss:.4f}")
        self.clock.pause(time.perf_counter() - began)
        self.step_log.exclude(time.perf_counter() - began)
        if self.target is not None and self.reached is None and self.last_loss <= self.target:
            self._reached(step)

    def _reached(self, step: int) -> None:
        tokens = step * self.program.config.tokens_per_step
        self.reached = {"target_step": step, "target_tokens": tokens,
                        "target_wall_time_s": round(self.clock.training_time(), 3)}
        self.metrics_log.log({"step": step, "target_val_loss": self.target, **self.reached})
        self.say(f"step {step}: reached the target val loss {self.target} ({tokens:,} tokens, "
                 f"{self.reached['target_wall_time_s']:.1f} s of training)")

    def reached_at(self, step: int) -> bool:
        return self.reached is not None and self.reached["target_step"] == step


class TrustedCheckpoints:
    """Saves a state only when the guard trusts it. The state's own loss is probed on the first
    validation batch: a step's loss is measured before its update, so a blown-up update shows
    only there."""

    def __init__(self, checkpointer, guard: HealthGuard, evaluation: Evaluation):
        self.checkpointer, self.guard, self.evaluation = checkpointer, guard, evaluation

    def save(self, step: int, state) -> None:
        probe = self.evaluation.loss(state["params"], batches=1) if self.evaluation.batches > 0 else 0.0
        if not self.guard.may_save(step, probe):
            return
        config = self.evaluation.program.config
        self.checkpointer.save(step, state, {"step": step, "config": config_lib.to_dict(config)})
        self.guard.trusted_step = step
