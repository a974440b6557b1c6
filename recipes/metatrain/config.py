"""Meta-training settings: YAML -> frozen, validated dataclasses.

A config file has the sections ``metatrain`` (outer loop), ``pes`` (the
estimator), ``inner`` (how every task trains its parameters) and
``families`` (the task families, one PES population each). ``lm_sampler``
optionally adds language-model families of random width/depth/context,
drawn once from its seed so a resumed run sees the same families.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Mapping

from recipes.optim.theta import THETA_NAMES
from recipes.errors import ConfigError, check_bool, check_choice, check_number
from recipes.config_parsing import dataclass_from_dict, merge_configs, parse_overrides, read_yaml
from recipes.metatrain.image_datasets import NAMES as IMAGE_DATASETS

FAMILY_KINDS = ("image_mlp", "lm")


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
        check_number("metatrain.outer_steps", self.outer_steps, low=0, integer=True)
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError(f"metatrain.out_dir must be a non-empty path, got {self.out_dir!r}")
        if not isinstance(self.init_theta, str) or not self.init_theta:
            raise ConfigError(
                f"metatrain.init_theta must be a path, hf://OWNER/REPO or one of {list(THETA_NAMES)}, got {self.init_theta!r}")
        for name in ("theta_seed", "seed"):
            check_number(f"metatrain.{name}", getattr(self, name), integer=True)
        check_number("metatrain.outer_lr", self.outer_lr, low=0)
        for name in ("outer_b1", "outer_b2"):
            check_number(f"metatrain.{name}", getattr(self, name), low=0, high=1, high_open=True)
        check_number("metatrain.outer_weight_decay", self.outer_weight_decay, low=0)
        check_number("metatrain.outer_grad_clip", self.outer_grad_clip, low=0, low_open=True, optional=True)
        check_number("metatrain.checkpoint_every_s", self.checkpoint_every_s, low=0)
        for name in ("snapshot_every", "profile_every"):
            check_number(f"metatrain.{name}", getattr(self, name), low=0, integer=True)
        check_number("metatrain.log_every", self.log_every, low=0, low_open=True, integer=True)
        check_bool("metatrain.profile", self.profile)
        check_choice("metatrain.wandb", self.wandb, ("disabled", "online", "offline"))
        check_number("metatrain.families_per_step", self.families_per_step, low=0, low_open=True, integer=True,
                     optional=True)


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
        check_number("pes.particles", self.particles, low=0, low_open=True, integer=True)
        if self.particles % 2:
            raise ConfigError(f"pes.particles must be even (antithetic pairs), got {self.particles}")
        check_number("pes.sigma", self.sigma, low=0, low_open=True)
        check_number("pes.truncation", self.truncation, low=0, low_open=True, integer=True)
        check_number("pes.min_length", self.min_length, low=0, low_open=True, integer=True)
        check_number("pes.max_length", self.max_length, low=0, low_open=True, integer=True)
        if self.min_length > self.max_length:
            raise ConfigError(f"pes.min_length ({self.min_length}) exceeds pes.max_length ({self.max_length})")
        check_number("pes.loss_cap", self.loss_cap, low=0, low_open=True)


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
            check_number(f"inner.{name}", getattr(self, name), low=0)
        for name in ("b1", "b2"):
            check_number(f"inner.{name}", getattr(self, name), low=0, high=1, high_open=True)
        check_bool("inner.orthogonalize", self.orthogonalize)
        check_number("inner.scale_min", self.scale_min, low=0, low_open=True)
        check_number("inner.scale_max", self.scale_max, low=0, low_open=True)
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
        check_choice("families[].kind", self.kind, FAMILY_KINDS)
        if isinstance(self.hidden, list):
            object.__setattr__(self, "hidden", tuple(self.hidden))
        for h in self.hidden:
            check_number("families[].hidden[]", h, low=0, low_open=True, integer=True)
        for name in ("batch", "n_layer", "n_head", "d_model", "context_length"):
            check_number(f"families[].{name}", getattr(self, name), low=0, low_open=True, integer=True)
        check_number("families[].weight", self.weight, low=0, low_open=True)
        if self.d_model % self.n_head:
            raise ConfigError(f"families[].d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.kind == "image_mlp":
            check_choice("families[].dataset", self.dataset, IMAGE_DATASETS)
        check_number("families[].vocab", self.vocab, low=2, integer=True)
        if self.name is None:
            if self.kind == "image_mlp":
                label = f"{self.dataset}_mlp_" + "_".join(map(str, self.hidden))
            else:
                label = f"lm_l{self.n_layer}_d{self.d_model}_c{self.context_length}"
            object.__setattr__(self, "name", label)


@dataclasses.dataclass(frozen=True)
class LMSamplerConfig:
    """Adds ``count`` lm families with layers/width/context drawn from the choices, or, when
    ``shapes`` lists [n_layer, d_model, context_length] triples, taken from them in turn: families
    of one shape then share a fusion key and train as one population (see ``fused``)."""

    count: int = 0
    seed: int = 0
    n_layer: tuple[int, ...] = (1, 2)
    d_model: tuple[int, ...] = (32, 64)
    context_length: tuple[int, ...] = (32, 64)
    n_head: int = 2
    batch: int = 8
    vocab: int = 512
    shapes: tuple[tuple[int, ...], ...] = ()  # empty: random draws from the choices above

    def __post_init__(self):
        check_number("lm_sampler.count", self.count, low=0, integer=True)
        shapes = tuple(tuple(shape) for shape in self.shapes)
        for shape in shapes:
            if len(shape) != 3:
                raise ConfigError(f"lm_sampler.shapes[] must be [n_layer, d_model, context_length], got {list(shape)}")
            for value in shape:
                check_number("lm_sampler.shapes[][]", value, low=0, low_open=True, integer=True)
        object.__setattr__(self, "shapes", shapes)
        for name in ("n_layer", "d_model", "context_length"):
            value = getattr(self, name)
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            if not value:
                raise ConfigError(f"lm_sampler.{name} needs at least one choice")
            object.__setattr__(self, name, value)

    def _drawn_shapes(self) -> list[tuple[int, ...]]:
        if self.shapes:  # in turn, so each shape gets count / len(shapes) families
            return [self.shapes[i % len(self.shapes)] for i in range(self.count)]
        rng = random.Random(self.seed)
        out: list[tuple[int, ...]] = []
        for _ in range(self.count):
            for _attempt in range(100):  # prefer shapes not drawn yet while there are any
                shape = (rng.choice(self.n_layer), rng.choice(self.d_model), rng.choice(self.context_length))
                if shape not in out:
                    break
            out.append(shape)
        return out

    def families(self) -> list[FamilyConfig]:
        out, seen = [], set()
        for shape in self._drawn_shapes():
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
    return dataclass_from_dict(MetaTrainConfig, dict(values or {}))


def load_config(path: str | Path, overrides: list[str] = ()) -> MetaTrainConfig:
    """YAML (``base:`` includes and anchors as for training recipes) plus ``--section.key=value``."""
    overrides = [item if item.startswith("--") else f"--{item}" for item in overrides]
    return from_dict(merge_configs(read_yaml(path), parse_overrides(overrides)))
