"""Held-out evaluation of a theta against tuned baselines on a small language-modeling task.

Every optimizer trains the same GPT (a shape none of the meta-training
families has) on the bundled corpus, once per seed, all seeds vmapped in one
compiled program per optimizer (learning rates are its arguments); the validation loss is the
mean over fixed windows of the val split. Baselines report their best
(learning rate, AdamW-side multiplier) point of the grid, judged by mean
validation loss over seeds; a best point on an edge of its grid is flagged.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model.config_base import ConfigError
from data.files import write_json
from recipes.metatrain.config import FamilyConfig
from recipes.metatrain.tasks.lm import TinyLM, corpus
from recipes.optim.config import OptimizerConfig
from recipes.optim.optimizers import build_optimizer, peak_rates

logger = logging.getLogger(__name__)

HELD_OUT = FamilyConfig(kind="lm", name="heldout_lm_l2_d48_c48", n_layer=2, n_head=2, d_model=48,
                        context_length=48, batch=16, vocab=512)
# Picks among meta-training snapshots, so the held-out task stays unseen by every choice.
VALIDATION = FamilyConfig(kind="lm", name="validation_lm_l3_d40_c40", n_layer=3, n_head=2, d_model=40,
                          context_length=40, batch=16, vocab=512)
EVAL_TASKS = {"heldout": HELD_OUT, "validation": VALIDATION, "default": None}  # default: read from the recipe
DEFAULT_RECIPE_FILE = "shakespeare_celo2.yaml"

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


def default_recipe_task(recipe: str = DEFAULT_RECIPE_FILE) -> tuple[FamilyConfig, dict]:
    """The default recipe's model, batch, vocabulary, schedule and decay: what users run, read from its YAML.

    Returns the task family and the EvalSettings fields that follow from the recipe.
    """
    from recipes.train.config import load_config  # the trainer's loader; only this task needs it

    cfg = load_config(recipe)
    m, sched = cfg.model, cfg.optimizer.schedule
    if sched.kind != "cosine":
        raise ConfigError(f"{recipe}: the default task mirrors a cosine schedule, got {sched.kind!r}")
    family = FamilyConfig(kind="lm", name=f"default_recipe_l{m.n_layer}_d{m.d_model}_c{cfg.data.seq_len}",
                          n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, context_length=cfg.data.seq_len,
                          batch=cfg.data.global_batch, vocab=m.vocab_size)
    settings = {"steps": cfg.train.steps, "warmup_fraction": sched.warmup_steps / cfg.train.steps,
                "min_lr_ratio": sched.min_lr_ratio, "weight_decay": cfg.optimizer.weight_decay}
    return family, settings

def val_windows(task: TinyLM, count: int) -> jnp.ndarray:
    """``count`` evenly spaced windows of the val split (the same for every optimizer)."""
    tokens = corpus(task.config.vocab_size, "val", task.source)
    length = task.config.context_length + 1
    starts = np.linspace(0, tokens.shape[0] - length - 1, count).astype(np.int64)
    return jnp.asarray(np.stack([tokens[s : s + length] for s in starts]))


def train_and_validate(task: TinyLM, candidate: Candidate, settings: EvalSettings) -> np.ndarray:
    """Final validation loss per seed."""
    run = _compiled_run(task, candidate.name, candidate.muon, settings)
    theta = None if candidate.theta is None else jax.tree.map(jnp.asarray, candidate.theta)
    keys = jax.random.split(jax.random.key(0), settings.seeds)
    peaks = jnp.float32(candidate.lr), jnp.float32(candidate.lr * candidate.adamw_lr_mult)
    return np.asarray(run(keys, task.data, val_windows(task, settings.val_windows), theta, *peaks))


@functools.lru_cache(maxsize=64)
def _compiled_run(task: TinyLM, name: str, muon: tuple, settings: EvalSettings):
    """All seeds of one optimizer as one jitted program, for any learning rates.

    Theta and the peak learning rates are arguments, not constants, so every snapshot of a
    meta-training run and every point of a grid share one compilation (the harness is built at
    peak 1, its updates scaled by ``peak_rates``).
    """
    config = OptimizerConfig(
        name=name, lr=1.0, adamw_lr_mult=1.0,
        weight_decay=settings.weight_decay, theta="normalized_momentum",
        schedule={"kind": "cosine", "warmup_steps": max(1, int(round(settings.warmup_fraction * settings.steps))),
                  "total_steps": settings.steps, "min_lr_ratio": settings.min_lr_ratio},
        muon=dict(muon),
    )

    def one_seed(key, data, windows, theta, lr, side_lr):
        shapes = task.abstract_params()
        tx, _ = build_optimizer(config, shapes, theta=theta)
        peaks = peak_rates(config, shapes, lr, side_lr)
        k_init, k_data = jax.random.split(key)
        params = task.init_params(k_init)

        def step(carry, t):
            params, opt_state = carry
            grads = jax.grad(task.loss)(params, jax.random.fold_in(k_data, t), data)
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(jnp.multiply, updates, peaks)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(settings.steps))
        batches = windows.reshape(-1, task.batch, windows.shape[-1])
        return jnp.mean(jax.lax.map(lambda w: task.loss_on(params, w), batches))

    return jax.jit(jax.vmap(one_seed, in_axes=(0, None, None, None, None, None)))


def summarize(losses: np.ndarray) -> dict:
    finite = losses[np.isfinite(losses)]
    mean = float(np.mean(losses)) if finite.size == losses.size else math.inf
    return {"mean": mean, "std": float(np.std(losses)) if finite.size == losses.size else math.nan,
            "min": float(np.min(losses)), "max": float(np.max(losses)), "per_seed": losses.tolist()}


# Fields that change how a point is computed but not its result: left out of its key, so points
# stored before a field existed stay valid.
_RESULT_NEUTRAL_MODEL_FIELDS = ("unroll_layers", "loss_chunk_tokens")
# Fields added later, left out of the key at the value that reproduces the results stored before.
_LATER_MODEL_FIELDS = {"residual_dtype": "float32"}
# remat was a bool before it named a policy: its two old values keep their old spelling.
_REMAT_AS_STORED = {"none": False, "full": True}


def model_key(config) -> str:
    """The model config as its repr, without the fields that cannot change a result."""
    def value(name):
        found = getattr(config, name)
        return _REMAT_AS_STORED.get(found, found) if name == "remat" else found

    fields = (f"{f.name}={value(f.name)!r}" for f in dataclasses.fields(config)
              if f.name not in _RESULT_NEUTRAL_MODEL_FIELDS
              and not (f.name in _LATER_MODEL_FIELDS and getattr(config, f.name) == _LATER_MODEL_FIELDS[f.name]))
    return f"{type(config).__name__}({', '.join(fields)})"


def point_key(task: TinyLM, settings: EvalSettings, c: Candidate) -> str:
    """What determines a point's result: the task (and its corpus), the settings, the optimizer and theta."""
    theta = "none"
    if c.theta is not None:
        leaves = jax.tree.leaves(c.theta)
        theta = hashlib.sha256(b"".join(np.asarray(x, np.float32).tobytes() for x in leaves)).hexdigest()[:16]
    return json.dumps([task.name, task.source, model_key(task.config), task.batch, dataclasses.asdict(settings), c.name,
                       c.lr, c.adamw_lr_mult, [list(m) for m in c.muon], theta])


def evaluate(candidates: list[Candidate], settings: EvalSettings, task: TinyLM | None = None,
             results_file: Path | None = None, screen_seeds: int | None = None, extend_edges: int = 0) -> list[dict]:
    """One row per label: its best (learning rate, AdamW-side multiplier) and that point's loss statistics.

    ``screen_seeds`` (fewer than ``settings.seeds``) searches the grid with that many seeds and trains only
    each label's best point with all of them: the row's statistics are that final run's.
    ``extend_edges`` steps a best point on an edge of its grid out by one more grid ratio, up to that many
    times per axis, so a reported best is inside its grid whenever the budget allows.
    ``results_file`` (JSON) keeps every finished point, so an interrupted table resumes where it stopped.
    """
    task = task or TinyLM(HELD_OUT, split="train")
    if settings.val_windows % task.batch:
        raise ConfigError(f"val_windows ({settings.val_windows}) must be a multiple of the task's batch ({task.batch})")
    if screen_seeds is not None and not 1 <= screen_seeds <= settings.seeds:
        raise ConfigError(f"screen_seeds must be in [1, seeds={settings.seeds}], got {screen_seeds}")
    done = json.loads(results_file.read_text()) if results_file is not None and results_file.is_file() else {}
    if results_file is not None:
        results_file.parent.mkdir(parents=True, exist_ok=True)
    search = settings if screen_seeds is None else dataclasses.replace(settings, seeds=screen_seeds)

    def run(c: Candidate, at: EvalSettings) -> dict:
        key = point_key(task, at, c)
        cached = key in done
        stats = done[key] if cached else summarize(train_and_validate(task, c, at))
        if results_file is not None and not cached:
            done[key] = stats
            write_json(results_file, done)  # after every point: an interrupted table keeps its work
        seeds = "" if at is settings else f" ({at.seeds} seed{'s' * (at.seeds > 1)}, search)"
        logger.info(f"  {c.label:<28} lr {c.lr:<8.3g} side x{c.adamw_lr_mult:<4g} val loss {stats['mean']:.4f} "
                    f"+- {stats['std']:.4f}{seeds}" + (" (done before)" if cached else ""))
        return {"label": c.label, "lr": c.lr, "adamw_lr_mult": c.adamw_lr_mult, **stats}

    by_label: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_label.setdefault(c.label, []).append(c)
    rows = []
    for label, group in by_label.items():
        runs = [run(c, search) for c in group]
        lrs = sorted({c.lr for c in group})
        mults = sorted({c.adamw_lr_mult for c in group})
        for axis, grid in (("lr", lrs), ("adamw_lr_mult", mults)):
            for _ in range(extend_edges if len(grid) > 1 else 0):
                best = _best(runs)
                step = _beyond_edge(grid, best[axis])
                if step is None:
                    break
                grid.append(step)
                grid.sort()
                point = {"lr": best["lr"], "adamw_lr_mult": best["adamw_lr_mult"], axis: step}
                runs.append(run(dataclasses.replace(group[0], **point), search))
        best = _best(runs)
        final = best
        if search is not settings:
            point = dataclasses.replace(group[0], lr=best["lr"], adamw_lr_mult=best["adamw_lr_mult"])
            final = run(point, settings)
        edges = []
        if len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1]):
            edges.append(f"lr {best['lr']:g}")
        if len(mults) > 1 and best["adamw_lr_mult"] in (mults[0], mults[-1]):
            edges.append(f"x{best['adamw_lr_mult']:g}")
        rows.append({**final, "grid": lrs, "mult_grid": mults, "at_edge": edges,
                     "search_seeds": search.seeds,
                     "points": [{k: r[k] for k in ("lr", "adamw_lr_mult", "mean", "std")} for r in runs]})
    return rows


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: (not math.isfinite(r["mean"]), r["mean"]))


def _beyond_edge(grid: list[float], value: float) -> float | None:
    """The next grid point past ``value`` when it is an edge, at the ratio of the two nearest points."""
    if value == grid[-1]:
        return float(f"{grid[-1] * grid[-1] / grid[-2]:.2g}")
    if value == grid[0]:
        return float(f"{grid[0] * grid[0] / grid[1]:.2g}")
    return None


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
    searched = {r["search_seeds"] for r in rows if r.get("search_seeds", settings.seeds) < settings.seeds}
    if searched:
        lines.append(f"\nGrids searched with {min(searched)} seed(s); each best point then trained with {settings.seeds}.")
    return "\n".join(lines)
