"""The Trainer: one run of a built program (recipes.train.build) into an open run directory.

    trainer = Trainer(program, TrainData.open(config, program), run_dir)
    summary = trainer.run()

``run`` restores the run directory's newest trusted checkpoint (or starts fresh), steps until
``train.steps`` (or ``stop_at_step``, a signal, the target, or too many non-finite steps), and
returns the summary it also writes to summary.json. The loop is recipes.train.loop's; what
happens besides stepping are the hooks of recipes.train.hooks (and the StopRequest), registered in
``_hooks``; the health policy is recipes.train.health.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax

from recipes.train import config as config_lib
from recipes.train import mesh as mesh_lib
from recipes.train.checkpoint import Checkpointer
from recipes.train.health import HealthGuard, NonFiniteError
from recipes.train.hooks import Evaluation, StepMetrics, Summary, TrustedCheckpoints
from recipes.train.loop import Clock, Hooks, Loop
from recipes.train.metrics import MetricsLog, progress_bar
from recipes.train.report import summary_lines
from recipes.train.run_dir import record_settings, resume_records
from recipes.train.stop import StopRequest

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainData:
    """The token loader (each process reads only its rows of every global batch) and how many
    validation batches an evaluation reads."""

    loader: object
    eval_batches: int

    @classmethod
    def open(cls, config, program, notes: list[str] | None = None) -> TrainData:
        """Notes on a short val split go to ``notes`` if given, else to the log."""
        from data.loader import TokenLoader, data_directory

        eval_batch = config.eval.batch_size or program.micro_batch
        mesh_lib.check_batch(eval_batch, eval_batch, program.mesh, what="eval.batch_size")
        loader = TokenLoader.open(data_directory(config.data.path), seq_len=config.seq_len,
                                  global_batch=config.data.global_batch,
                                  seed=config.train.seed if config.data.seed is None else config.data.seed,
                                  val_global_batch=eval_batch, vocab_size=config.model.vocab_size)
        eval_batches = min(config.eval.batches, loader.num_val_batches)
        say = logger.info if notes is None else notes.append
        if eval_batches == 0:
            say(f"note: the val split holds no full batch of {eval_batch} x {config.seq_len + 1} tokens, so this "
                "run reports no validation loss; lower eval.batch_size or data.seq_len, or prepare more val data")
        elif eval_batches < config.eval.batches:
            say(f"note: the val split holds {eval_batches} batches of {eval_batch}; evaluating on those")
        return cls(loader, eval_batches)


class Trainer:
    def __init__(self, program, data: TrainData, run_dir: Path):
        self.program, self.config, self.data, self.run_dir = program, program.config, data, run_dir
        self.checkpointer = Checkpointer(run_dir / "checkpoints", keep=self.config.train.keep_checkpoints)
        self.stop_step = self.config.train.stop_at_step or self.config.train.steps
        self.state = None  # the state it trained to, once run() has trained
        self.evaluation = None  # its Evaluation hook, once run() has begun training

    def restore_or_init(self) -> tuple[int | None, dict]:
        """(the step restored, or None for a fresh start; the train state)."""
        latest, state = self.checkpointer.restore_newest(self.program.state_abstract)
        if latest is None:
            return None, self.program.init_state()
        logger.info(f"resumed {self.run_dir} at step {latest}")
        return latest, state

    def run(self) -> dict:
        latest, state = self.restore_or_init()
        start = int(jax.device_get(state["step"]))
        if start >= self.stop_step and (self.run_dir / "summary.json").is_file():
            return self._already_finished(start)
        config, metrics_log = self.config, self._metrics_log(latest)
        before_resume, reached = resume_records(metrics_log.records, config.train.target_val_loss)
        if reached is not None and config.train.target_val_loss is not None and config.train.stop_at_target:
            return self._target_already_reached(start, reached, metrics_log)
        if start < self.stop_step or latest is None:  # it will train: config.yaml says with what
            record_settings(self.run_dir, self.program)
        clock = Clock(before_resume)  # training time: compiling and evaluation left out
        with jax.set_mesh(self.program.mesh), StopRequest(check_every=config.logging.every) as stop_request, \
                self.data.loader.iter_from(start, stop_step=self.stop_step, prefetch=config.data.prefetch) as batches, \
                progress_bar(start, self.stop_step, config.logging.progress and jax.process_index() == 0) as bar:
            hooks, summary = self._hooks(start, latest, metrics_log, reached, stop_request, bar)
            try:
                info = Loop(self._step, hooks, clock).run(state, start, self.stop_step, batches)
            except NonFiniteError as error:
                summary.stopped_by_nonfinite(error.step, clock)
                raise
            finally:
                self.checkpointer.close()
                metrics_log.close()
        self.state = info.state
        return summary.result

    def _step(self, state, batch) -> tuple[dict, dict]:
        _, tokens_local = batch  # (step index, this process's rows)
        return self.program.train_step(state, mesh_lib.global_batch_array(tokens_local, self.program.mesh))

    def _hooks(self, start: int, latest: int | None, metrics_log, reached, stop_request, bar) -> tuple[Hooks, Summary]:
        """What the loop does besides stepping, in the order it is done at a step."""
        config, hooks = self.config, Hooks()
        guard = HealthGuard(max_nonfinite_steps=config.train.max_nonfinite_steps,
                            spike_factor=config.train.spike_factor, vocab_size=config.model.vocab_size,
                            trusted_step=latest)
        step_metrics = StepMetrics(config, metrics_log, guard, bar, list(self.program.mesh.devices.flat))
        self.evaluation = evaluation = Evaluation(self.program, self.data.loader, self.data.eval_batches,
                                                  metrics_log, reached)
        checkpoints = TrustedCheckpoints(self.checkpointer, guard, evaluation.probe, config, start, latest)
        summary = Summary(self.run_dir, start, config.train.steps,
                          [stop_request, step_metrics, evaluation, checkpoints])
        hooks.add(step_metrics, every=1, metrics=True)  # read one step late
        hooks.add(lambda info: bar.update(1), every=1)
        if start == 0 and config.eval.at_start and start < self.stop_step:
            hooks.add(evaluation.measure, at_start=True)
        hooks.add(evaluation, every=config.eval.every, last=True, after_metrics=True)
        hooks.add(checkpoints.check, every=1)  # a failed write stops the run now, not at the next save
        hooks.add(stop_request, every=1)
        hooks.add(checkpoints.periodic, every=config.train.checkpoint_every, after_metrics=True)  # the guard saw it
        hooks.add(stop_request.announce, on_stop=True)
        # The last checkpoint on disk, W&B finished and the bar closed before the summary says how it ended.
        for closing in (checkpoints.at_end, lambda info: metrics_log.close(), lambda info: bar.close(), summary):
            hooks.add(closing, at_end=True)
        return hooks, summary

    def _metrics_log(self, latest: int | None) -> MetricsLog:
        config = self.config
        return MetricsLog(self.run_dir, wandb_mode=config.logging.wandb, project=config.logging.wandb_project,
                          name=config.logging.wandb_name or self.run_dir.name, config=config_lib.to_dict(config),
                          resume_step=latest)

    def _already_finished(self, start: int) -> dict:
        self.checkpointer.close()
        finished = json.loads((self.run_dir / "summary.json").read_text())
        logger.info(f"{self.run_dir} is already at step {start} of {self.stop_step}: nothing to train "
                    "(its summary.json is kept)")
        logger.info(json.dumps(finished))
        # Nothing is left at the steps asked for, whatever stopped the run last time: a scheduler
        # that reruns on a signal's exit code must not rerun this forever.
        return {**finished, "stopped_by": None}

    def _target_already_reached(self, start: int, reached: dict, metrics_log: MetricsLog) -> dict:
        target = self.config.train.target_val_loss
        logger.info(f"{self.run_dir} reached val loss {target} at step {reached['target_step']} "
                    "(train.stop_at_target): nothing to train")
        metrics_log.close()
        self.checkpointer.close()
        return {"start_step": start, "total_steps": self.config.train.steps, "run_dir": str(self.run_dir),
                "train_loss": None, "val_loss": None, "stopped_by": None, "skipped_steps": 0,
                "target_val_loss": target, **reached}

    def closing_lines(self, summary: dict, wall_s: float) -> list[str]:
        """What a person reads when the run has trained (recipes.train.report)."""
        tokens = (summary["step"] - summary["start_step"]) * self.config.tokens_per_step
        return summary_lines(summary, self.evaluation.first_loss, tokens, wall_s, self.run_dir / "checkpoints",
                             self.config.sample.prompt)
