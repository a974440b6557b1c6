"""What the training loop does besides stepping, as hooks of recipes.train.loop; Trainer._hooks
registers them, each with its cadence.

    StepMetrics         each step's metrics once read (one step late): the health guard, a
                        metrics.jsonl row every logging.every steps with throughput and MFU, the
                        progress bar's figures
    Evaluation          the validation loss every eval.every steps, and steps to the target
                        (train.target_val_loss); with train.stop_at_target the run ends there
    TrustedCheckpoints  a checkpoint every train.checkpoint_every steps and at the end, only of a
                        state the health guard trusts
    Summary             summary.json and its JSON line, from what the other hooks report
(stop handling is recipes.train.stop.StopRequest, a hook too.)
"""
from __future__ import annotations

import json
import logging

import jax
import numpy as np

from recipes.train import mesh as mesh_lib
from recipes.train import config as config_lib
from recipes.train.health import HealthGuard
from recipes.train.loop import StepInfo
from recipes.train.metrics import json_safe, mfu
from recipes.train.run_dir import write_summary

logger = logging.getLogger(__name__)

TARGET_KEYS = ("target_step", "target_tokens", "target_wall_time_s")


class StepMetrics:
    """The host side of each step: judged by the guard, averaged over logging.every steps into a
    metrics.jsonl row with throughput, shown on the progress bar."""

    def __init__(self, config, metrics_log, guard: HealthGuard, bar, devices):
        self.config, self.metrics_log, self.guard, self.bar, self.devices = config, metrics_log, guard, bar, devices
        self.last_loss = None
        self._steps, self._losses = 0, []  # the healthy steps since the last row

    def __call__(self, info) -> None:
        m, step = info.metrics, info.step
        loss = float(m["loss"])
        if not self.guard.observe(step, loss, float(m["grad_norm"]), bool(m["finite"])):
            return
        self._steps += 1
        self._losses.append(loss)
        self.last_loss = loss
        if step % self.config.logging.every and step != info.last:
            return
        tokens_per_step = self.config.tokens_per_step
        tokens_per_s = self._steps * tokens_per_step / max(info.clock.lap(), 1e-9)
        row = {"step": step, "loss": float(np.mean(self._losses)), "grad_norm": float(m["grad_norm"]),
               "lr": float(m["lr"]), "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s,
               "mfu": mfu(tokens_per_s, self.config.model, self.config.seq_len, self.devices),
               "skipped_steps": self.guard.skipped_steps, "wall_time_s": round(info.clock.training_time(), 3)}
        row.update({k: float(v) for k, v in m.get("diagnostics", {}).items()})
        self.metrics_log.log(row)
        postfix = {"loss": f"{row['loss']:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if row["mfu"] is not None:
            postfix["mfu"] = f"{row['mfu']:.1%}"
        self.bar.set_postfix(postfix, refresh=False)
        self._steps, self._losses = 0, []

    def report(self, info) -> dict:
        return {"train_loss": self.last_loss, "skipped_steps": self.guard.skipped_steps}


class Evaluation:
    """Mean loss over the first eval.batches validation batches, its time left out of the clock;
    records when it first reaches train.target_val_loss (tokens and training time to target, the
    sweeps' measure) and, with train.stop_at_target, stops the run there."""

    def __init__(self, program, loader, batches: int, metrics_log, reached: dict | None):
        self.program, self.loader, self.batches, self.metrics_log = program, loader, batches, metrics_log
        self.target = program.config.train.target_val_loss
        self.stop_at_target = program.config.train.stop_at_target
        self.reached = reached  # target_step, target_tokens, target_wall_time_s once reached
        self.first_loss = self.last_loss = None

    def loss(self, params, batches: int | None = None) -> float:
        mesh = self.program.mesh
        losses = [self.program.eval_step(params, mesh_lib.global_batch_array(b, mesh))
                  for b in self.loader.val_batches(self.batches if batches is None else batches)]
        return float(np.mean(jax.device_get(losses)))

    def probe(self, params) -> float:
        """The loss of ``params`` on the first validation batch (0.0 without one)."""
        return self.loss(params, batches=1) if self.batches > 0 else 0.0

    def measure(self, info) -> None:
        """The validation loss of the state (before the first step too: the run goes on at the target)."""
        if self.batches == 0:
            return
        with info.clock.paused():
            self.last_loss = self.loss(info.state["params"])
            if self.first_loss is None:
                self.first_loss = self.last_loss
            self.metrics_log.log({"step": info.step, "val_loss": self.last_loss})
            logger.info(f"step {info.step}: val loss {self.last_loss:.4f}")
        if self.target is not None and self.reached is None and self.last_loss <= self.target:
            self._reached(info)

    def __call__(self, info) -> None:
        self.measure(info)
        if self.stop_at_target and self.reached is not None and self.reached["target_step"] == info.step:
            info.stop("target")

    def _reached(self, info) -> None:
        tokens = info.step * self.program.config.tokens_per_step
        self.reached = {"target_step": info.step, "target_tokens": tokens,
                        "target_wall_time_s": round(info.clock.training_time(), 3)}
        self.metrics_log.log({"step": info.step, "target_val_loss": self.target, **self.reached})
        logger.info(f"step {info.step}: reached the target val loss {self.target} ({tokens:,} tokens, "
                    f"{self.reached['target_wall_time_s']:.1f} s of training)")

    def report(self, info) -> dict:
        out = {"val_loss": self.last_loss}
        if info.stop_reason == "target":
            out["ended_at_target"] = True
        if self.target is not None:
            out.update(target_val_loss=self.target, **(self.reached or dict.fromkeys(TARGET_KEYS)))
        return out


class TrustedCheckpoints:
    """Saves a state only when the guard trusts it. The state's own loss is probed on the first
    validation batch: a step's loss is measured before its update, so a blown-up update shows
    only there. Periodic saves skip the last step, which the end saves; a failed write stops
    the run at the step it is found (check, every step)."""

    def __init__(self, checkpointer, guard: HealthGuard, probe, config, start: int, restored: int | None):
        self.checkpointer, self.guard, self.probe, self.config = checkpointer, guard, probe, config
        self.start, self.restored = start, restored

    def check(self, info) -> None:
        self.checkpointer.check()

    def periodic(self, info) -> None:
        if info.step != info.last:
            self.save(info.step, info.state)

    def at_end(self, info) -> None:
        """The state it ended with (unless nothing was trained since the checkpoint it resumed), on
        disk before the summary says so."""
        if info.step > self.start or self.restored is None:
            self.save(info.step, info.state)
        self.checkpointer.wait()

    def save(self, step: int, state) -> None:
        if not self.guard.may_save(step, self.probe(state["params"])):
            return
        self.checkpointer.save(step, state, {"step": step, "config": config_lib.to_dict(self.config)})
        self.guard.trusted_step = step

    def report(self, info) -> dict:
        return {"trusted_step": self.guard.trusted_step}


class Summary:
    """summary.json (what sweeps and schedulers read to tell a finished run from a stopped one) and,
    at the end, its JSON line. Fields come from the hooks given (their report()), in KEYS' order."""

    KEYS = ("start_step", "total_steps", "run_dir", "stopped_by", "ended_at_target", "finished", "step",
            "train_loss", "val_loss", "skipped_steps", "trusted_step", "wall_time_s", "target_val_loss",
            *TARGET_KEYS)

    def __init__(self, run_dir, start: int, total_steps: int, reporters: list):
        self.run_dir, self.total_steps, self.reporters = run_dir, total_steps, reporters
        self.fixed = {"start_step": start, "total_steps": total_steps, "run_dir": str(run_dir)}
        self.result = None  # the summary written at the end

    def fields(self, info, **overrides) -> dict:
        fields = {**self.fixed, "step": info.step, "wall_time_s": round(info.clock.training_time(), 3)}
        for reporter in self.reporters:
            fields.update(reporter.report(info))
        fields["finished"] = info.step >= self.total_steps or bool(fields.get("ended_at_target"))
        fields.update(overrides)
        return {key: fields[key] for key in self.KEYS if key in fields}

    def __call__(self, info) -> None:
        self.result = self.fields(info)
        write_summary(self.run_dir, self.result)
        logger.info(json.dumps(json_safe(self.result)))

    def stopped_by_nonfinite(self, step: int, clock) -> None:
        """summary.json of a run the health guard stopped at ``step`` (its error says the rest)."""
        info = StepInfo(step, None, clock, step)
        write_summary(self.run_dir, self.fields(info, stopped_by="nonfinite", finished=False))
