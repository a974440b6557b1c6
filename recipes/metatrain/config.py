"""Meta-training settings: YAML -> frozen, validated dataclasses.

A config file has the sections ``metatrain`` (outer loop), ``pes`` (the
estimator), ``inner`` (how every task trains its parameters) and
``families`` (the task families, one PES population each). ``lm_sampler``
optionally adds language-model families of random width/depth/context,
drawn once from its seed so a resumed run sees the same families.
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any, Mapping

from recipes.optim.theta import THETA_NAMES
from recipes.train.config_parsing import from_dict as build_config
from recipes.errors import ConfigError
from recipes.train.config_parsing import merge_configs, parse_overrides, read_yaml
from recipes.metatrain.image_datasets import NAMES as IMAGE_DATASETS

FAMILY_KINDS = ("image_mlp", "lm")


def _number(where: str, value, *, positive=False, non_negative=False, integer=False):
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if ok and non_negative:
        ok = value >= 0
    if not ok:
        kind = "an int" if integer else "a number"
        bound = " > 0" if positive else (" >= 0" if non_negative else "")
        raise ConfigError(f"{where} must be {kind}{bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OuterConfig:
    outer_steps: int = 100_000
    out_dir: str = "runs/metatrain"
    # A theta.state path (or a directory holding one), hf://OWNER/REPO, or a builtin.
    init_theta: str = "normalized_momentum"
    theta_seed: int = 0
    seed: int = 0
    outer_lr: float = 5e-5
    outer_b1: float = 0.9
    outer_b2: float = 0.999
    outer_weight_decay: float = 0.0
    # Clips the global norm of the PES gradient estimate; None leaves it alone.
    outer_grad_clip: float | None = None
    # Full state saved at most this often (seconds) and at the end.
    checkpoint_every_s: float = 300.0
    # Official-format theta snapshots kept under thetas/ every this many outer steps (0: none).
    snapshot_every: int = 1000
    log_every: int = 1
    # Measures the learned rule's share of the time every this many outer steps (0: once at start).
    profile_every: int = 0
    profile: bool = True
    wandb: str = "disabled"  # disabled | online | offline
    wandb_project: str = "celo2-metatrain"
    # Families evaluated per outer step (None: all); picked at random without replacement.
    families_per_step: int | None = None

    def __post_init__(self):
        _number("metatrain.outer_steps", self.outer_steps, non_negative=True, integer=True)
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError(f"metatrain.out_dir must be a non-empty path, got {self.out_dir!r}")
        if not isinstance(self.init_theta, str) or not self.init_theta:
            raise ConfigError(
                f"metatrain.init_theta must be a path, hf://OWNER/REPO or one of {list(THETA_NAMES)}, got {self.init_theta!r}")
        for name in ("theta_seed", "seed"):
            _number(f"metatrain.{name}", getattr(self, name), integer=True)
        _number("metatrain.outer_lr", self.outer_lr, non_negative=True)
        for name in ("outer_b1", "outer_b2"):
            value = getattr(self, name)
            _number(f"metatrain.{name}", value, non_negative=True)
            if value >= 1:
                raise ConfigError(f"metatrain.{name} must be in [0, 1), got {value!r}")
        _number("metatrain.outer_weight_decay", self.outer_weight_decay, non_negative=True)
        if self.outer_grad_clip is not None:
            _number("metatrain.outer_grad_clip", self.outer_grad_clip, positive=True)
        _number("metatrain.checkpoint_every_s", self.checkpoint_every_s, non_negative=True)
        for name in ("snapshot_every", "profile_every"):
            _number(f"metatrain.{name}", getattr(self, name), non_negative=True, integer=True)
        _number("metatrain.log_every", self.log_every, positive=True, integer=True)
        if not isinstance(self.profile, bool):
            raise ConfigError(f"metatrain.profile must be a bool, got {self.profile!r}")
        if self.wandb not in ("disabled", "online", "offline"):
            raise ConfigError(f"metatrain.wandb must be disabled, online or offline, got {self.wandb!r}")
        if self.families_per_step is not None:
            _number("metatrain.families_per_step", self.families_per_step, positive=True, integer=True)


@dataclasses.dataclass(frozen=True)
class PESConfig:
    particles: int = 8  # per family; antithetic pairs, so even
    sigma: float = 0.01
    truncation: int = 50
    min_length: int = 100  # inner-problem lengths are log-uniform in [min_length, max_length]
    max_length: int = 2000
    # Normalized per-step losses (loss / the task's initial loss) are clipped here; NaN maps to it.
    loss_cap: float = 1.5

    def __post_init__(self):
        _number("pes.particles", self.particles, positive=True, integer=True)
        if self.particles % 2:
            raise ConfigError(f"pes.particles must be even (antithetic pairs), got {self.particles}")
        _number("pes.sigma", self.sigma, positive=True)
        _number("pes.truncation", self.truncation, positive=True, integer=True)
        _number("pes.min_length", self.min_length, positive=True, integer=True)
        _number("pes.max_length", self.max_length, positive=True, integer=True)
        if self.min_length > self.max_length:
            raise ConfigError(f"pes.min_length ({self.min_length}) exceeds pes.max_length ({self.max_length})")
        _number("pes.loss_cap", self.loss_cap, positive=True)


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    """How each task trains: Celo2 on hidden matrices, Adam on embeddings and biases."""

    lr: float = 1e-3
    adamw_lr_mult: float = 20.0
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    orthogonalize: bool = True
    # Each task is reparameterized by a global scale, log-uniform in [scale_min, scale_max].
    scale_min: float = 1e-3
    scale_max: float = 1e3

    def __post_init__(self):
        for name in ("lr", "adamw_lr_mult", "weight_decay"):
            _number(f"inner.{name}", getattr(self, name), non_negative=True)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _number(f"inner.{name}", value, non_negative=True)
            if value >= 1:
                raise ConfigError(f"inner.{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.orthogonalize, bool):
            raise ConfigError(f"inner.orthogonalize must be a bool, got {self.orthogonalize!r}")
        _number("inner.scale_min", self.scale_min, positive=True)
        _number("inner.scale_max", self.scale_max, positive=True)
        if self.scale_min > self.scale_max:
            raise ConfigError(f"inner.scale_min ({self.scale_min}) exceeds inner.scale_max ({self.scale_max})")


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    """One task family. image_mlp: an MLP on an 8x8 image set; lm: a small GPT on a token corpus."""

    kind: str = "image_mlp"
    name: str | None = None
    batch: int = 64
    weight: float = 1.0  # this family's share of the averaged gradient
    # image_mlp
    hidden: tuple[int, ...] = (64, 32)
    dataset: str = "digits"  # digits | mnist | fashion_mnist | photos (recipes/metatrain/image_datasets.py)
    # lm
    n_layer: int = 1
    n_head: int = 2
    d_model: int = 32
    context_length: int = 32
    vocab: int = 512  # the corpus is re-tokenized to its vocab-1 commonest tokens plus "other"
    corpus: str = ""  # a shard directory written by data.prepare; "" is the bundled Shakespeare

    def __post_init__(self):
        if self.kind not in FAMILY_KINDS:
            raise ConfigError(f"family kind {self.kind!r} unknown; valid: {list(FAMILY_KINDS)}")
        if isinstance(self.hidden, list):
            object.__setattr__(self, "hidden", tuple(self.hidden))
        for h in self.hidden:
            _number("families[].hidden[]", h, positive=True, integer=True)
        for name in ("batch", "n_layer", "n_head", "d_model", "context_length", "vocab"):
            _number(f"families[].{name}", getattr(self, name), positive=True, integer=True)
        _number("families[].weight", self.weight, positive=True)
        if self.d_model % self.n_head:
            raise ConfigError(f"families[].d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.kind == "image_mlp" and self.dataset not in IMAGE_DATASETS:
            raise ConfigError(f"families[].dataset {self.dataset!r} unknown; valid: {list(IMAGE_DATASETS)}")
        if self.vocab < 2:
            raise ConfigError(f"families[].vocab must be >= 2, got {self.vocab}")
        if self.name is None:
            if self.kind == "image_mlp":
                label = f"{self.dataset}_mlp_" + "_".join(map(str, self.hidden))
            else:
                label = f"lm_l{self.n_layer}_d{self.d_model}_c{self.context_length}"
            object.__setattr__(self, "name", label)


@dataclasses.dataclass(frozen=True)
class LMSamplerConfig:
    """Adds ``count`` lm families with layers/width/context drawn from the choices."""

    count: int = 0
    seed: int = 0
    n_layer: tuple[int, ...] = (1, 2)
    d_model: tuple[int, ...] = (32, 64)
    context_length: tuple[int, ...] = (32, 64)
    n_head: int = 2
    batch: int = 8
    vocab: int = 512

    def __post_init__(self):
        _number("lm_sampler.count", self.count, non_negative=True, integer=True)
        for name in ("n_layer", "d_model", "context_length"):
            value = getattr(self, name)
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            if not value:
                raise ConfigError(f"lm_sampler.{name} needs at least one choice")
            object.__setattr__(self, name, value)

    def families(self) -> list[FamilyConfig]:
        rng = random.Random(self.seed)
        out, seen = [], set()
        shapes = set()
        for _ in range(self.count):
            for _attempt in range(100):  # prefer shapes not drawn yet while there are any
                shape = (rng.choice(self.n_layer), rng.choice(self.d_model), rng.choice(self.context_length))
                if shape not in shapes:
                    break
            shapes.add(shape)
            name = f"lm_l{shape[0]}_d{shape[1]}_c{shape[2]}"
            suffix = 1
            while name in seen:  # the same shape drawn twice: a second, independent population
                suffix += 1
                name = f"lm_l{shape[0]}_d{shape[1]}_c{shape[2]}_{suffix}"
            seen.add(name)
            out.append(FamilyConfig(kind="lm", name=name, n_layer=shape[0], d_model=shape[1], context_length=shape[2],
                                    n_head=self.n_head, batch=self.batch, vocab=self.vocab))
        return out


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    metatrain: OuterConfig = dataclasses.field(default_factory=OuterConfig)
    pes: PESConfig = dataclasses.field(default_factory=PESConfig)
    inner: InnerConfig = dataclasses.field(default_factory=InnerConfig)
    families: tuple[FamilyConfig, ...] = ()
    lm_sampler: LMSamplerConfig = dataclasses.field(default_factory=LMSamplerConfig)

    def __post_init__(self):
        if not self.all_families():
            raise ConfigError("no task families: list some under 'families' or set lm_sampler.count > 0")
        names = [f.name for f in self.all_families()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"task family names must be unique; repeated: {duplicates} (set families[].name)")

    def all_families(self) -> list[FamilyConfig]:
        return list(self.families) + self.lm_sampler.families()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(values: Mapping[str, Any]) -> MetaTrainConfig:
    """The typed config from a nested dict, with the trainer's checks: unknown keys are refused
    naming the closest valid key, wrong types naming the expected type."""
    return build_config(MetaTrainConfig, dict(values or {}))


def load_config(path: str | Path, overrides: list[str] = ()) -> MetaTrainConfig:
    """YAML (``base:`` includes and anchors as for training recipes) plus ``--section.key=value``."""
    overrides = [item if item.startswith("--") else f"--{item}" for item in overrides]
    return from_dict(merge_configs(read_yaml(path), parse_overrides(overrides)))
