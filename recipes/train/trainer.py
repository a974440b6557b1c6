"""The Trainer: one run of a built program (recipes.train.build) into an open run directory.

    trainer = Trainer(program, TrainData.open(config, program), run_dir)
    summary = trainer.run()

``run`` restores the run directory's newest trusted checkpoint (or starts fresh), steps until
``train.steps`` (or ``stop_at_step``, a signal, the target, or too many non-finite steps), and
returns the summary it also writes to summary.json. What happens besides stepping lives in
recipes.train.hooks; the health policy in recipes.train.health.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from recipes.train import config as config_lib
from recipes.train import mesh as mesh_lib
from recipes.train.checkpoint import Checkpointer
from recipes.train.health import HealthGuard, NonFiniteError
from recipes.train.hooks import Evaluation, StepLog, TrustedCheckpoints, WallClock
from recipes.train.metrics import MetricsLog, json_safe, progress_bar
from recipes.train.run_dir import record_settings, resume_records, write_summary
from recipes.train.stop import StopRequest


def log0(*args) -> None:
    """Prints on process 0 only, so a multi-host run says each thing once."""
    if jax.process_index() == 0:
        print(*args, flush=True)


@dataclasses.dataclass
class TrainData:
    """The token loader (each process reads only its rows of every global batch) and how many
    validation batches an evaluation reads."""

    loader: object
    eval_batches: int

    @classmethod
    def open(cls, config, program, log=log0) -> TrainData:
        from data.loader import TokenLoader, data_directory

        eval_batch = config.eval.batch_size or program.micro_batch
        mesh_lib.check_batch(eval_batch, eval_batch, program.mesh, what="eval.batch_size")
        loader = TokenLoader.open(data_directory(config.data.path), seq_len=config.seq_len,
                                  global_batch=config.data.global_batch,
                                  seed=config.train.seed if config.data.seed is None else config.data.seed,
                                  val_global_batch=eval_batch, vocab_size=config.model.vocab_size)
        eval_batches = min(config.eval.batches, loader.num_val_batches)
        if eval_batches == 0:
            log(f"note: the val split holds no full batch of {eval_batch} x {config.seq_len + 1} tokens, so this "
                "run reports no validation loss; lower eval.batch_size or data.seq_len, or prepare more val data")
        elif eval_batches < config.eval.batches:
            log(f"note: the val split holds {eval_batches} batches of {eval_batch}; evaluating on those")
        return cls(loader, eval_batches)


class Trainer:
    def __init__(self, program, data: TrainData, run_dir: Path, log=log0):
        self.program, self.config, self.data, self.run_dir, self.log = program, program.config, data, run_dir, log
        self.checkpointer = Checkpointer(run_dir / "checkpoints", keep=self.config.train.keep_checkpoints)
        self.stop_step = self.config.train.stop_at_step or self.config.train.steps
        self.state = None  # the state it trained to, once run() has trained

    def restore_or_init(self) -> tuple[int | None, dict]:
        """(the step restored, or None for a fresh start; the train state)."""
        latest, state = self.checkpointer.restore_newest(self.program.state_abstract, log=self.log)
        if latest is None:
            return None, self.program.init_state()
        self.log(f"resumed {self.run_dir} at step {latest}")
        return latest, state

    def run(self) -> dict:
        latest, state = self.restore_or_init()
        start = int(jax.device_get(state["step"]))
        if start >= self.stop_step and (self.run_dir / "summary.json").is_file():
            self.checkpointer.close()
            finished = json.loads((self.run_dir / "summary.json").read_text())
            self.log(f"{self.run_dir} is already at step {start} of {self.stop_step}: nothing to train "
                     "(its summary.json is kept)")
            self.log(json.dumps(finished))
            # Nothing is left at the steps asked for, whatever stopped the run last time: a scheduler
            # that reruns on a signal's exit code must not rerun this forever.
            return {**finished, "stopped_by": None}
        config = self.config
        metrics_log = MetricsLog(self.run_dir, wandb_mode=config.logging.wandb, project=config.logging.wandb_project,
                                 name=config.logging.wandb_name or self.run_dir.name,
                                 config=config_lib.to_dict(config), resume_step=latest)
        target = config.train.target_val_loss
        before_resume, reached = resume_records(metrics_log.records, target)
        self.summary = {"start_step": start, "total_steps": config.train.steps, "run_dir": str(self.run_dir)}
        if target is not None and reached is not None and config.train.stop_at_target:
            self.log(f"{self.run_dir} reached val loss {target} at step {reached['target_step']} "
                     "(train.stop_at_target): nothing to train")
            metrics_log.close()
            self.checkpointer.close()
            return {**self.summary, "train_loss": None, "val_loss": None, "stopped_by": None, "skipped_steps": 0,
                    "target_val_loss": target, **reached}
        if start < self.stop_step or latest is None:  # it will train: config.yaml says with what
            record_settings(self.run_dir, self.program)
        self.clock = WallClock(before_resume)
        self.guard = HealthGuard(max_nonfinite_steps=config.train.max_nonfinite_steps,
                                 spike_factor=config.train.spike_factor, vocab_size=config.model.vocab_size,
                                 trusted_step=latest, log=self.log)
        show_bar = config.logging.progress and jax.process_index() == 0
        with jax.set_mesh(self.program.mesh), StopRequest() as stop_request, \
                self.data.loader.iter_from(start, stop_step=self.stop_step, prefetch=config.data.prefetch) as batches, \
                progress_bar(start, self.stop_step, show_bar) as bar:
            self.bar = bar
            self.step_log = StepLog(config, metrics_log, self.guard, self.clock, bar,
                                    list(self.program.mesh.devices.flat), self.stop_step)
            self.evaluation = Evaluation(self.program, self.data.loader, self.data.eval_batches, metrics_log,
                                         self.clock, self.step_log, reached, say=bar.write if show_bar else self.log)
            self.checkpoints = TrustedCheckpoints(self.checkpointer, self.guard, self.evaluation)
            try:
                self.state, step = self._loop(state, start, latest, batches, stop_request)
            except NonFiniteError as error:
                self.summary.update(stopped_by="nonfinite", finished=False)
                write_summary(self.run_dir, self._summary(error.step))
                raise
            finally:
                self.checkpointer.close()
                metrics_log.close()
        self.summary["finished"] = step >= config.train.steps or bool(self.summary.get("ended_at_target"))
        summary = self._summary(step)
        write_summary(self.run_dir, summary)
        self.log(json.dumps(json_safe(summary)))
        return summary

    def _loop(self, state, start: int, latest: int | None, batches, stop_request) -> tuple[dict, int]:
        """Steps until the data, a stop, the target or a signal ends it; returns (state, step)."""
        config, mesh = self.config, self.program.mesh
        self.summary["stopped_by"] = None
        if start == 0 and config.eval.at_start and start < self.stop_step:
            self.evaluation(0, state["params"])
        pending, step = None, start  # the step whose metrics are still on the device
        for index, tokens_local in batches:
            # Dispatch this step before reading the last one's metrics, so the device never idles.
            state, metrics = self.program.train_step(state, mesh_lib.global_batch_array(tokens_local, mesh))
            step = index + 1
            if step == start + 1:  # compilation is not training time
                jax.block_until_ready(metrics)
                self.clock.restart()
            if pending is not None:
                self.step_log(*pending)
            pending = (step, metrics)
            self.bar.update(1)
            if step % config.eval.every == 0 or step == self.stop_step:
                self.step_log(*pending)
                pending = None
                self.evaluation(step, state["params"])
                if config.train.stop_at_target and self.evaluation.reached_at(step):
                    self.summary["ended_at_target"] = True
                    break
            self.checkpointer.check()  # a failed write stops the run now, not at the next save
            stopping = stop_request.agreed(check_others=step % config.logging.every == 0)
            periodic = step % config.train.checkpoint_every == 0
            if (periodic or stopping) and pending is not None:
                self.step_log(*pending)  # the guard must see the step it would save
                pending = None
            if periodic and step != self.stop_step and not stopping:
                self.checkpoints.save(step, state)
            if stopping:
                self.summary["stopped_by"] = stop_request.signal_name
                self.log(f"{stop_request.signal_name} received: saving a checkpoint at step {step} and exiting")
                break
        if pending is not None:
            self.step_log(*pending)
        if step > start or latest is None:
            self.checkpoints.save(step, state)
        return state, step

    def _summary(self, step: int) -> dict:
        summary = {**self.summary, "step": step, "train_loss": self.step_log.last_loss,
                   "val_loss": self.evaluation.last_loss, "skipped_steps": self.guard.skipped_steps,
                   "trusted_step": self.guard.trusted_step, "wall_time_s": round(self.clock.training_time(), 3)}
        if self.evaluation.target is not None:
            summary.update(target_val_loss=self.evaluation.target,
                           **(self.evaluation.reached or dict.fromkeys(("target_step", "target_tokens",
                                                                         "target_wall_time_s"))))
        return summary
