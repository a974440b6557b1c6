"""The outer loop: PES gradients from every family, AdamW on theta, logs and checkpoints.

Randomness is a function of (seed, outer step), so a resumed run continues
exactly as an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recipes.optim.theta import resolve_theta
from recipes.train.metrics import MetricsLog
from recipes.train.run_dir import RunDirLock
from recipes.train.stop import StopRequest
from recipes.errors import ConfigError
from recipes.files import write_json
from recipes.metatrain import checkpoint as ckpt
from recipes.metatrain.config import MetaTrainConfig
from recipes.metatrain.fused import FusedFamilies, fusable_groups
from recipes.metatrain.population import Population
from recipes.metatrain.tasks import build_task


def outer_optimizer(config: MetaTrainConfig) -> optax.GradientTransformation:
    m = config.metatrain
    adamw = optax.adamw(m.outer_lr, b1=m.outer_b1, b2=m.outer_b2, weight_decay=m.outer_weight_decay)
    tx = adamw if m.outer_grad_clip is None else optax.chain(optax.clip_by_global_norm(m.outer_grad_clip), adamw)
    # A non-finite estimate (it should not happen: losses are capped) is skipped, not applied.
    return optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)


class MetaTrainer:
    def __init__(self, config: MetaTrainConfig, log: Callable[[str], None] = print, *, fuse: bool = True,
                 devices=None):
        """``fuse``: families of one shape share one compiled truncation (False: one each, as a
        baseline); ``devices``: where particles are split (default: every local device)."""
        self.config, self.log = config, log
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
            state = checkpointer.restore_newest(target, log=self.log)
            if state is None:  # starting over would overwrite theta.state and the snapshots
                raise ConfigError(
                    f"no checkpoint of {self.out_dir} restores (each was moved to a *.damaged/ directory "
                    "beside it); to start over, move the directory aside or choose another metatrain.out_dir")
            self.log(f"resumed {self.out_dir} at outer step {int(state.step)}")
            return state
        self.log(f"starting from theta {m.init_theta!r}")
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
        m = self.config.metatrain
        lock = RunDirLock(self.out_dir)  # one meta-trainer per directory
        try:
            lock.acquire(log=self.log)
        except RuntimeError as error:
            raise ConfigError(str(error).replace("train.out_dir", "metatrain.out_dir")) from None
        try:
            return self._run(m)
        finally:
            lock.release()

    def _run(self, m) -> ckpt.MetaState:
        checkpointer = ckpt.MetaCheckpointer(self.out_dir, self.config)
        try:
            return self._train(m, checkpointer)
        finally:
            checkpointer.close()  # waits for the last save

    def _train(self, m, checkpointer: ckpt.MetaCheckpointer) -> ckpt.MetaState:
        state = self.initial_state(checkpointer)
        write_json(self.out_dir / "config.json", ckpt.config_record(self.config))
        if (self.out_dir / "wandb_id").is_file() and not (self.out_dir / "wandb_id.txt").exists():
            (self.out_dir / "wandb_id").rename(self.out_dir / "wandb_id.txt")  # the name used before
        ckpt.set_aside_after(self.out_dir, int(state.step), log=self.log)  # before this timeline's snapshots
        metrics_log = MetricsLog(self.out_dir, wandb_mode=m.wandb, project=m.wandb_project, name=self.out_dir.name,
                                 config=dataclasses.asdict(self.config), resume_step=int(state.step))
        # The trainer's stop handling: a signal ends the loop, the state is saved, and the
        # caller exits with 128 + the signal's number.
        with StopRequest() as stop_request:
            try:
                last_save, window_start, window_steps = time.time(), time.perf_counter(), 0
                saved_step = int(state.step) if checkpointer.exists() else None  # resumed: on disk
                if m.profile and int(state.step) < m.outer_steps:
                    self._log_record(self.profile(state), metrics_log, int(state.step), "profile")
                while int(state.step) < m.outer_steps and not stop_request:
                    state, metrics = self.outer_step(state)
                    step = int(state.step)
                    window_steps += 1
                    if step % m.log_every == 0 or step == m.outer_steps:
                        elapsed = time.perf_counter() - window_start
                        metrics["outer_it_per_s"] = window_steps / elapsed
                        metrics["seconds_per_outer_it"] = elapsed / window_steps
                        self._log_record(metrics, metrics_log, step)
                        window_start, window_steps = time.perf_counter(), 0
                    if m.snapshot_every and step % m.snapshot_every == 0:
                        ckpt.snapshot_theta(self.out_dir, state.theta, step)
                    if m.profile and m.profile_every and step % m.profile_every == 0 and step < m.outer_steps:
                        self._log_record(self.profile(state), metrics_log, step, "profile")
                        window_start = time.perf_counter()
                    if time.time() - last_save >= m.checkpoint_every_s:
                        checkpointer.save(state)
                        last_save, saved_step = time.time(), step
                if saved_step != int(state.step):  # a step already on disk is not saved again
                    checkpointer.save(state)
                self.stopped_by = stop_request.signal_number
                if stop_request:
                    self.log(f"stopped by {stop_request.signal_name} at outer step {int(state.step)}; checkpoint saved")
            finally:
                metrics_log.close()
        return state

    def _log_record(self, record: dict, metrics_log: MetricsLog, step: int, kind: str = "train") -> None:
        metrics_log.log({"step": step, "kind": kind, "outer_step": step, "time": time.time(), **record})
        if kind == "profile":
            self.log(f"[profile] learned rule {100 * record['rule_share']:.0f}% of unroll time "
                     f"({record['unroll_seconds_per_truncation']:.2f}s per truncation of all families, "
                     f"forward/backward alone {record['fwd_bwd_seconds_per_truncation']:.2f}s)")
        else:
            families = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in record.items() if k.startswith("meta_loss/"))
            self.log(f"step {step}: meta_loss {record['meta_loss']:.4f} ({families}) "
                     f"|g| {record['grad_norm']:.3g} {record['outer_it_per_s']:.3f} it/s")
