"""The outer loop: PES gradients from every family, AdamW on theta, logs and checkpoints.

The loop is the trainer's (recipes.train.loop), with the outer step as its step and its own hooks
(_hooks): metrics rows and lines, theta snapshots, profiles, timed checkpoints, stop on a signal.
Randomness is a function of (seed, outer step), so a resumed run continues exactly as an
uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recipes.optim.theta import resolve_theta
from recipes.train.loop import Hooks, Loop
from recipes.train.metrics import MetricsLog
from recipes.train.run_dir import locked
from recipes.train.stop import StopRequest
from model.config_base import ConfigError
from data.files import write_json
from recipes.metatrain import checkpoint as ckpt
from recipes.metatrain.config import MetaTrainConfig
from recipes.metatrain.fused import FusedFamilies, fusable_groups
from recipes.metatrain.population import Population
from recipes.metatrain.tasks import build_task

logger = logging.getLogger(__name__)


def outer_optimizer(config: MetaTrainConfig) -> optax.GradientTransformation:
    m = config.metatrain
    adamw = optax.adamw(m.outer_lr, b1=m.outer_b1, b2=m.outer_b2, weight_decay=m.outer_weight_decay)
    tx = adamw if m.outer_grad_clip is None else optax.chain(optax.clip_by_global_norm(m.outer_grad_clip), adamw)
    # A non-finite estimate (it should not happen: losses are capped) is skipped, not applied.
    return optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)


class MetaTrainer:
    def __init__(self, config: MetaTrainConfig, *, fuse: bool = True, devices=None):
        """``fuse``: families of one shape share one compiled truncation (False: one each, as a
        baseline); ``devices``: where particles are split (default: every local device)."""
        self.config = config
        self.fuse, self.devices = fuse, devices
        self.stopped_by: int | None = None  # the signal that ended the last run(), if one did
        self.out_dir = Path(config.metatrain.out_dir)
        self.families = config.all_families()
        self.tasks = [build_task(f) for f in self.families]
        self.populations = [Population(t, config.pes, config.inner) for t in self.tasks]
        self.weights = np.array([f.weight for f in self.families], np.float64)
        self.outer_tx = outer_optimizer(config)
        self._outer_update = jax.jit(self._outer_update_fn)
        self._fused: dict[tuple[int, ...], FusedFamilies] = {}
        self._order = {p.task.name: i for i, p in enumerate(self.populations)}

    def fused(self, indices: list[int]) -> list[tuple[list[int], FusedFamilies]]:
        """The families ``indices``, grouped by shape, each group one compiled truncation."""
        out = []
        chosen = [self.populations[i] for i in indices]
        for local in fusable_groups(chosen) if self.fuse else [[j] for j in range(len(indices))]:
            group = tuple(indices[j] for j in local)
            if group not in self._fused:
                self._fused[group] = FusedFamilies([self.populations[i] for i in group], self.devices)
            out.append((list(group), self._fused[group]))
        return out

    def retarget(self, **metatrain_changes) -> "MetaTrainer":
        """The same trainer (compiled functions included) with other metatrain.* settings."""
        new = object.__new__(MetaTrainer)
        new.__dict__.update(self.__dict__)
        m = dataclasses.replace(self.config.metatrain, **metatrain_changes)
        new.config = dataclasses.replace(self.config, metatrain=m)
        new.out_dir = Path(m.out_dir)
        return new

    # -- state -----------------------------------------------------------------
    def fresh_state(self, theta) -> ckpt.MetaState:
        root = jax.random.key(self.config.metatrain.seed)
        pops = {p.task.name: jax.jit(p.init)(theta, jax.random.fold_in(root, i)) for i, p in enumerate(self.populations)}
        return ckpt.MetaState(theta, self.outer_tx.init(theta), jnp.zeros((), jnp.int32), pops,
                              jax.random.key_data(jax.random.fold_in(root, 1_000_003)))

    def initial_state(self, checkpointer: ckpt.MetaCheckpointer) -> ckpt.MetaState:
        m = self.config.metatrain
        if checkpointer.exists():
            target = jax.eval_shape(self.fresh_state, resolve_theta("normalized_momentum"))
            state = checkpointer.restore_newest(target)
            if state is None:  # starting over would overwrite theta.state and the snapshots
                raise ConfigError(
                    f"no checkpoint of {self.out_dir} restores (each was moved to a *.damaged/ directory "
                    "beside it); to start over, move the directory aside or choose another metatrain.out_dir")
            logger.info(f"resumed {self.out_dir} at outer step {int(state.step)}")
            return state
        logger.info(f"starting from theta {m.init_theta!r}")
        return self.fresh_state(self.initial_theta())

    def initial_theta(self) -> dict:
        m = self.config.metatrain
        return resolve_theta(m.init_theta, m.theta_seed, setting="metatrain.init_theta")

    # -- one outer step -----------------------------------------------------------
    def _outer_update_fn(self, theta, opt_state, grads, weights):
        grad = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights, g)), *grads)
        updates, opt_state = self.outer_tx.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, optax.tree.norm(grad)

    def chosen(self, step: int) -> list[int]:
        k = self.config.metatrain.families_per_step
        if k is None or k >= len(self.populations):
            return list(range(len(self.populations)))
        rng = np.random.default_rng([self.config.metatrain.seed, step])
        return sorted(rng.choice(len(self.populations), size=k, replace=False).tolist())

    def outer_step(self, state: ckpt.MetaState):
        step = int(state.step)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
        pops, grads, record = dict(state.populations), {}, {}
        chosen = self.chosen(step)
        for indices, group in self.fused(chosen):
            results = group.truncation(state.theta, tuple(pops[group.names[j]] for j in range(len(indices))),
                                       tuple(jax.random.fold_in(key, i) for i in indices), group.data)
            for name, (pop_state, grad, losses, resets) in zip(group.names, results):
                pops[name] = pop_state
                grads[name] = grad
                record[name] = (losses, resets, pop_state.inner.last_loss)
        weights = self.weights[chosen] / self.weights[chosen].sum()
        grads = [grads[self.populations[i].task.name] for i in chosen]
        theta, opt_state, grad_norm = self._outer_update(state.theta, state.opt_state, grads,
                                                         [float(w) for w in weights])
        new = ckpt.MetaState(theta, opt_state, state.step + 1, pops, state.rng)
        metrics = {"outer_step": step + 1, "grad_norm": float(grad_norm)}
        fam_losses = []
        for name, (losses, resets, raw) in sorted(record.items(), key=lambda item: self._order[item[0]]):
            meta_loss = float(jnp.mean(losses))
            fam_losses.append(meta_loss)
            metrics[f"meta_loss/{name}"] = meta_loss
            metrics[f"train_loss/{name}"] = float(jnp.nanmean(raw))
            metrics[f"resets/{name}"] = int(jnp.sum(resets))
        metrics["meta_loss"] = float(np.mean(fam_losses))
        return new, metrics

    # -- profiling ------------------------------------------------------------------
    def profile(self, state: ckpt.MetaState) -> dict:
        """Share of a truncation spent in the learned rule rather than the task's forward/backward."""
        out, total_full, total_fb = {}, 0.0, 0.0
        for _, group in self.fused(list(range(len(self.populations)))):
            full, fwd_bwd = group.time_split(state.theta, tuple(state.populations[n] for n in group.names))
            out[f"rule_share/{'+'.join(group.names)}"] = max(0.0, 1.0 - fwd_bwd / full)
            total_full, total_fb = total_full + full, total_fb + fwd_bwd
        out["rule_share"] = max(0.0, 1.0 - total_fb / total_full)
        out["fwd_bwd_seconds_per_truncation"] = total_fb
        out["unroll_seconds_per_truncation"] = total_full
        return out

    # -- the run ----------------------------------------------------------------------
    def run(self) -> ckpt.MetaState:
        with locked(self.out_dir, "metatrain.out_dir"):  # one meta-trainer per directory
            checkpointer = ckpt.MetaCheckpointer(self.out_dir, self.config)
            try:
                return self._train(self.config.metatrain, checkpointer)
            finally:
                checkpointer.close()  # waits for the last save

    def _train(self, m, checkpointer: ckpt.MetaCheckpointer) -> ckpt.MetaState:
        state = self.initial_state(checkpointer)
        start = int(state.step)
        self._prepare_out_dir(start)
        metrics_log = MetricsLog(self.out_dir, wandb_mode=m.wandb, project=m.wandb_project, name=self.out_dir.name,
                                 config=dataclasses.asdict(self.config), resume_step=start)
        # The trainer's stop handling: a signal ends the loop, the state is saved, and the
        # caller exits with 128 + the signal's number.
        with StopRequest() as stop_request:
            try:
                hooks = self._hooks(m, checkpointer, metrics_log, stop_request, start)
                info = Loop(lambda s, _: self.outer_step(s), hooks).run(
                    state, start, m.outer_steps, itertools.repeat(None, max(m.outer_steps - start, 0)))
            finally:
                metrics_log.close()
        return info.state

    def _prepare_out_dir(self, start: int) -> None:
        write_json(self.out_dir / "config.json", ckpt.config_record(self.config))
        if (self.out_dir / "wandb_id").is_file() and not (self.out_dir / "wandb_id.txt").exists():
            (self.out_dir / "wandb_id").rename(self.out_dir / "wandb_id.txt")  # the name used before
        ckpt.set_aside_after(self.out_dir, start)  # before this timeline's snapshots

    def _hooks(self, m, checkpointer, metrics_log: MetricsLog, stop_request: StopRequest, start: int) -> Hooks:
        """What the loop does besides the outer step, in the order it is done at a step."""
        hooks, saves, logged = Hooks(), TimedCheckpoints(checkpointer, m.checkpoint_every_s, start), start

        def log_metrics(info) -> None:  # with the throughput since the last line
            nonlocal logged
            elapsed, steps, logged = info.clock.lap(), info.step - logged, info.step
            metrics = {**info.read(), "outer_it_per_s": steps / elapsed, "seconds_per_outer_it": elapsed / steps}
            self._log_record(metrics, metrics_log, info.step)

        def profile(info) -> None:
            if info.step < m.outer_steps:
                with info.clock.paused():  # not outer-step time
                    self._log_record(self.profile(info.state), metrics_log, info.step, "profile")

        def stopped(info) -> None:
            self.stopped_by = stop_request.signal_number
            if stop_request:
                logger.info(f"stopped by {stop_request.signal_name} at outer step {info.step}; checkpoint saved")

        hooks.add(log_metrics, every=m.log_every, last=True)
        hooks.add(lambda info: ckpt.snapshot_theta(self.out_dir, info.state.theta, info.step), every=m.snapshot_every)
        if m.profile:
            hooks.add(profile, every=m.profile_every, at_start=True)
        hooks.add(saves, every=1)
        hooks.add(stop_request, every=1, at_start=True)  # before each outer step, the first too
        hooks.add(saves.at_end, at_end=True)
        hooks.add(stopped, at_end=True)
        return hooks

    def _log_record(self, record: dict, metrics_log: MetricsLog, step: int, kind: str = "train") -> None:
        metrics_log.log({"step": step, "kind": kind, "outer_step": step, "time": time.time(), **record})
        if kind == "profile":
            logger.info(f"[profile] learned rule {100 * record['rule_share']:.0f}% of unroll time "
                        f"({record['unroll_seconds_per_truncation']:.2f}s per truncation of all families, "
                        f"forward/backward alone {record['fwd_bwd_seconds_per_truncation']:.2f}s)")
        else:
            families = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in record.items() if k.startswith("meta_loss/"))
            logger.info(f"step {step}: meta_loss {record['meta_loss']:.4f} ({families}) "
                        f"|g| {record['grad_norm']:.3g} {record['outer_it_per_s']:.3f} it/s")


class TimedCheckpoints:
    """A checkpoint every metatrain.checkpoint_every_s seconds, and at the end unless that step is on
    disk already (a resumed run's first step is)."""

    def __init__(self, checkpointer: ckpt.MetaCheckpointer, every_s: float, start: int):
        self.checkpointer, self.every_s = checkpointer, every_s
        self.last_save, self.saved_step = time.time(), start if checkpointer.exists() else None

    def __call__(self, info) -> None:
        if time.time() - self.last_save >= self.every_s:
            self.save(info)

    def at_end(self, info) -> None:
        """On disk before the loop ends: while it runs, a repeated SIGTERM cannot cut the save short."""
        if self.saved_step != info.step:
            self.save(info)
        self.checkpointer.wait()

    def save(self, info) -> None:
        self.checkpointer.save(info.state)
        self.last_save, self.saved_step = time.time(), info.step
