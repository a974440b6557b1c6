"""Held-out evaluation of a theta against tuned baselines on a small language-modeling task.

Every optimizer trains the same GPT (a shape none of the meta-training
families has) on the bundled corpus, once per seed, all seeds vmapped in one
compiled program per (optimizer, learning rate); the validation loss is the
mean over fixed windows of the val split. Baselines report their best
(learning rate, AdamW-side multiplier) point of the grid, judged by mean
validation loss over seeds; a best point on an edge of its grid is flagged.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recipes.config import ConfigError
from recipes.metatrain.checkpoint import write_json
from recipes.metatrain.config import FamilyConfig
from recipes.metatrain.tasks_lm import TinyLM, corpus
from recipes.optimizer_config import OptimizerConfig
from recipes.optimizers import build_optimizer

HELD_OUT = FamilyConfig(kind="lm", name="heldout_lm_l2_d48_c48", n_layer=2, n_head=2, d_model=48,
                        context_length=48, batch=16, vocab=512)
# Picks among meta-training snapshots, so the held-out task stays unseen by every choice.
VALIDATION = FamilyConfig(kind="lm", name="validation_lm_l3_d40_c40", n_layer=3, n_head=2, d_model=40,
                          context_length=40, batch=16, vocab=512)
# The default recipe's model and batch (configs/shakespeare_celo2.yaml) with the GPT-2 vocabulary: what users run.
DEFAULT_RECIPE = FamilyConfig(kind="lm", name="default_recipe_l4_d64_c64", n_layer=4, n_head=4, d_model=64,
                              context_length=64, batch=16, vocab=50257)
EVAL_TASKS = {"heldout": HELD_OUT, "validation": VALIDATION, "default": DEFAULT_RECIPE}


@dataclasses.dataclass(frozen=True)
class Candidate:
    label: str  # e.g. "celo2 (theta.state)" or "adamw"
    name: str  # the harness optimizer
    lr: float
    theta: dict | None = None
    adamw_lr_mult: float = 1.0
    muon: tuple = ()  # MuonConfig overrides as (key, value) pairs, e.g. (("consistent_rms", 1.0),)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    steps: int = 300
    seeds: int = 3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    val_windows: int = 256
    min_lr_ratio: float = 0.0


# The default recipe's own schedule and decay (150 steps, 20 warmup, cosine to 0.1x, weight decay 0.1).
TASK_SETTINGS = {"default": {"steps": 150, "warmup_fraction": 20 / 150, "min_lr_ratio": 0.1, "weight_decay": 0.1}}


def val_windows(task: TinyLM, count: int) -> jnp.ndarray:
    """``count`` evenly spaced windows of the val split (the same for every optimizer)."""
    tokens = corpus(task.config.vocab_size, "val", task.source)
    length = task.config.context_length + 1
    starts = np.linspace(0, tokens.shape[0] - length - 1, count).astype(np.int64)
    return jnp.asarray(np.stack([tokens[s : s + length] for s in starts]))


def train_and_validate(task: TinyLM, candidate: Candidate, settings: EvalSettings) -> np.ndarray:
    """Final validation loss per seed."""
    run = _compiled_run(task, candidate.name, candidate.lr, candidate.adamw_lr_mult, candidate.muon, settings)
    theta = None if candidate.theta is None else jax.tree.map(jnp.asarray, candidate.theta)
    keys = jax.random.split(jax.random.key(0), settings.seeds)
    return np.asarray(run(keys, task.data, val_windows(task, settings.val_windows), theta))


@functools.lru_cache(maxsize=64)
def _compiled_run(task: TinyLM, name: str, lr: float, adamw_lr_mult: float, muon: tuple, settings: EvalSettings):
    """All seeds of one (optimizer, learning rate) as one jitted program.

    Theta is an argument, not a constant, so every snapshot of a meta-training
    run shares one compilation.
    """
    config = OptimizerConfig(
        name=name, lr=lr, adamw_lr_mult=adamw_lr_mult,
        weight_decay=settings.weight_decay, theta="normalized_momentum",
        schedule={"kind": "cosine", "warmup_steps": max(1, int(round(settings.warmup_fraction * settings.steps))),
                  "total_steps": settings.steps, "min_lr_ratio": settings.min_lr_ratio},
        muon=dict(muon),
    )

    def one_seed(key, data, windows, theta):
        tx, _ = build_optimizer(config, task.abstract_params(), theta=theta)
        k_init, k_data = jax.random.split(key)
        params = task.init_params(k_init)

        def step(carry, t):
            params, opt_state = carry
            grads = jax.grad(task.loss)(params, jax.random.fold_in(k_data, t), data)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(settings.steps))
        batches = windows.reshape(-1, task.batch, windows.shape[-1])
        return jnp.mean(jax.lax.map(lambda w: task.loss_on(params, w), batches))

    return jax.jit(jax.vmap(one_seed, in_axes=(0, None, None, None)))


def summarize(losses: np.ndarray) -> dict:
    finite = losses[np.isfinite(losses)]
    mean = float(np.mean(losses)) if finite.size == losses.size else math.inf
    return {"mean": mean, "std": float(np.std(losses)) if finite.size == losses.size else math.nan,
            "min": float(np.min(losses)), "max": float(np.max(losses)), "per_seed": losses.tolist()}


def point_key(task: TinyLM, settings: EvalSettings, c: Candidate) -> str:
    """What determines a point's result: the task (and its corpus), the settings, the optimizer and theta."""
    theta = "none"
    if c.theta is not None:
        leaves = jax.tree.leaves(c.theta)
        theta = hashlib.sha256(b"".join(np.asarray(x, np.float32).tobytes() for x in leaves)).hexdigest()[:16]
    return json.dumps([task.name, task.source, repr(task.config), task.batch, dataclasses.asdict(settings), c.name,
                       c.lr, c.adamw_lr_mult, [list(m) for m in c.muon], theta])


def evaluate(candidates: list[Candidate], settings: EvalSettings, task: TinyLM | None = None, log=print,
             results_file: Path | None = None) -> list[dict]:
    """One row per label: its best (learning rate, AdamW-side multiplier) and that point's loss statistics.

    ``results_file`` (JSON) keeps every finished point, so an interrupted table resumes where it stopped.
    """
    task = task or TinyLM(HELD_OUT, split="train")
    if settings.val_windows % task.batch:
        raise ConfigError(f"val_windows ({settings.val_windows}) must be a multiple of the task's batch ({task.batch})")
    done = json.loads(results_file.read_text()) if results_file is not None and results_file.is_file() else {}
    if results_file is not None:
        results_file.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for c in candidates:
        key = point_key(task, settings, c)
        cached = key in done
        stats = done[key] if cached else summarize(train_and_validate(task, c, settings))
        if results_file is not None and not cached:
            done[key] = stats
            write_json(results_file, done)  # after every point: an interrupted table keeps its work
        log(f"  {c.label:<28} lr {c.lr:<8.3g} side x{c.adamw_lr_mult:<4g} val loss {stats['mean']:.4f} "
            f"+- {stats['std']:.4f}" + (" (done before)" if cached else ""))
        results.setdefault(c.label, []).append({"label": c.label, "lr": c.lr, "adamw_lr_mult": c.adamw_lr_mult,
                                                **stats})
    rows = []
    for label, runs in results.items():
        best = min(runs, key=lambda r: (not math.isfinite(r["mean"]), r["mean"]))
        lrs = sorted({r["lr"] for r in runs})
        mults = sorted({r["adamw_lr_mult"] for r in runs})
        edges = []
        if len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1]):
            edges.append(f"lr {best['lr']:g}")
        if len(mults) > 1 and best["adamw_lr_mult"] in (mults[0], mults[-1]):
            edges.append(f"x{best['adamw_lr_mult']:g}")
        rows.append({**best, "grid": lrs, "mult_grid": mults, "at_edge": edges,
                     "points": [{k: r[k] for k in ("lr", "adamw_lr_mult", "mean", "std")} for r in runs]})
    return rows


def format_table(rows: list[dict], settings: EvalSettings) -> str:
    head = (f"| optimizer | best lr (grid) | best side multiplier (grid) | val loss mean | std over {settings.seeds} "
            "seeds | min | max |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["mean"]):
        grid = ", ".join(f"{lr:g}" for lr in r["grid"])
        mults = ", ".join(f"{m:g}" for m in r.get("mult_grid", [r.get("adamw_lr_mult", 1.0)]))
        edge = f" (at the grid's edge: {', '.join(r['at_edge'])})" if r.get("at_edge") else ""
        lines.append(f"| {r['label']}{edge} | {r['lr']:g} ({grid}) | {r.get('adamw_lr_mult', 1.0):g} ({mults}) | "
                     f"{r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f} | {r['max']:.4f} |")
    return "\n".join(lines)
