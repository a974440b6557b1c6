"""Meta-training settings: YAML -> frozen, validated config classes.

A config file has the sections ``metatrain`` (outer loop), ``pes`` (the
estimator), ``inner`` (how every task trains its parameters) and
``families`` (the task families, one PES population each). ``lm_sampler``
optionally adds language-model families of random width/depth/context,
drawn once from its seed so a resumed run sees the same families.
"""
from __future__ import annotations

import random
from typing import Annotated, Literal

from pydantic import Field, model_validator

from recipes.config_parsing import Bool, Float, Int, Must, config_class
from recipes.errors import ConfigError
from recipes.metatrain.image_datasets import NAMES as IMAGE_DATASETS
from recipes.optim.config import ThetaSource

FAMILY_KINDS = ("image_mlp", "lm")
PES_OBJECTIVES = ("mean_train_loss", "final_unseen_loss")

Positive = Annotated[Int, Field(gt=0)]
Shape = Annotated[tuple[Positive, ...], Field(min_length=3, max_length=3), Must("[n_layer, d_model, context_length]")]


@config_class("metatrain.")
class OuterConfig:
    outer_steps: Int = Field(100_000, ge=0)
    out_dir: Annotated[str, Field(min_length=1), Must("a non-empty path")] = "runs/metatrain"
    init_theta: ThetaSource = "normalized_momentum"
    theta_seed: Int = 0
    seed: Int = 0
    outer_lr: Float = Field(5e-5, ge=0)
    outer_b1: Float = Field(0.9, ge=0, lt=1)
    outer_b2: Float = Field(0.999, ge=0, lt=1)
    outer_weight_decay: Float = Field(0.0, ge=0)
    # Clips the global norm of the PES gradient estimate; None leaves it alone.
    outer_grad_clip: Float | None = Field(None, gt=0)
    # Full state saved at most this often (seconds) and at the end.
    checkpoint_every_s: Float = Field(300.0, ge=0)
    # Official-format theta snapshots kept under thetas/ every this many outer steps (0: none).
    snapshot_every: Int = Field(1000, ge=0)
    log_every: Positive = 1
    # Measures the learned rule's share of the time every this many outer steps (0: once at start).
    profile_every: Int = Field(0, ge=0)
    profile: Bool = True
    wandb: Literal["disabled", "online", "offline"] = "disabled"
    wandb_project: str = "celo2-metatrain"
    # Families evaluated per outer step (None: all); picked at random without replacement.
    families_per_step: Positive | None = None


@config_class("pes.")
class PESConfig:
    particles: Positive = 8  # per family; antithetic pairs, so even
    sigma: Float = Field(0.01, gt=0)
    truncation: Positive = 50
    min_length: Positive = 100  # inner-problem lengths are log-uniform in [min_length, max_length]
    max_length: Positive = 2000
    # Normalized per-step losses (loss / the task's initial loss) are clipped here; NaN maps to it.
    loss_cap: Float = Field(1.5, gt=0)
    # The meta-loss of a truncation: mean_train_loss (the steps' training losses, as published) or
    # final_unseen_loss (the final parameters on batches no step trained on: rewards generalizing).
    objective: Literal[PES_OBJECTIVES] = "mean_train_loss"

    @model_validator(mode="after")
    def _consistent(self):
        if self.particles % 2:
            raise ConfigError(f"pes.particles must be even (antithetic pairs), got {self.particles}")
        if self.min_length > self.max_length:
            raise ConfigError(f"pes.min_length ({self.min_length}) exceeds pes.max_length ({self.max_length})")
        return self


@config_class("inner.")
class InnerConfig:
    """How each task trains: Celo2 on hidden matrices, Adam on embeddings and biases."""

    lr: Float = Field(1e-3, ge=0)
    adamw_lr_mult: Float = Field(20.0, ge=0)
    b1: Float = Field(0.9, ge=0, lt=1)
    b2: Float = Field(0.95, ge=0, lt=1)
    weight_decay: Float = Field(0.0, ge=0)
    orthogonalize: Bool = True
    # Each task is reparameterized by a global scale, log-uniform in [scale_min, scale_max].
    scale_min: Float = Field(1e-3, gt=0)
    scale_max: Float = Field(1e3, gt=0)

    @model_validator(mode="after")
    def _scales_ordered(self):
        if self.scale_min > self.scale_max:
            raise ConfigError(f"inner.scale_min ({self.scale_min}) exceeds inner.scale_max ({self.scale_max})")
        return self


@config_class("families[].")
class FamilyConfig:
    """One task family. image_mlp: an MLP on an 8x8 image set; lm: a small GPT on a token corpus."""

    kind: Literal[FAMILY_KINDS] = "image_mlp"
    name: str | None = None  # None: named after its kind and shape
    batch: Positive = 64
    weight: Float = Field(1.0, gt=0)  # this family's share of the averaged gradient
    # image_mlp
    hidden: tuple[Positive, ...] = (64, 32)
    dataset: Literal[IMAGE_DATASETS] = "digits"  # recipes/metatrain/image_datasets.py
    # lm
    n_layer: Positive = 1
    n_head: Positive = 2
    d_model: Positive = 32
    context_length: Positive = 32
    vocab: Int = Field(512, ge=2)  # the corpus is re-tokenized to its vocab-1 commonest tokens plus "other"
    corpus: str = ""  # a shard directory written by data.prepare; "" is the bundled Shakespeare

    @model_validator(mode="after")
    def _named(self):
        if self.d_model % self.n_head:
            raise ConfigError(f"families[].d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.name is None:
            if self.kind == "image_mlp":
                label = f"{self.dataset}_mlp_" + "_".join(map(str, self.hidden))
            else:
                label = f"lm_l{self.n_layer}_d{self.d_model}_c{self.context_length}"
            object.__setattr__(self, "name", label)
        return self


@config_class("lm_sampler.")
class LMSamplerConfig:
    """Adds ``count`` lm families with layers/width/context drawn from the choices, or, when
    ``shapes`` lists [n_layer, d_model, context_length] triples, taken from them in turn: families
    of one shape then share a fusion key and train as one population (see ``fused``)."""

    count: Int = Field(0, ge=0)
    seed: Int = 0
    n_layer: tuple[Int, ...] = Field((1, 2), min_length=1)
    d_model: tuple[Int, ...] = Field((32, 64), min_length=1)
    context_length: tuple[Int, ...] = Field((32, 64), min_length=1)
    n_head: Int = 2
    batch: Int = 8
    vocab: Int = 512
    shapes: tuple[Shape, ...] = ()  # empty: random draws from the choices above

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


@config_class()
class MetaTrainConfig:
    metatrain: OuterConfig = OuterConfig()
    pes: PESConfig = PESConfig()
    inner: InnerConfig = InnerConfig()
    families: tuple[FamilyConfig, ...] = ()
    lm_sampler: LMSamplerConfig = LMSamplerConfig()

    @model_validator(mode="after")
    def _families(self):
        if not self.all_families():
            raise ConfigError("no task families: list some under 'families' or set lm_sampler.count > 0")
        names = [f.name for f in self.all_families()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"task family names must be unique; repeated: {duplicates} (set families[].name)")
        return self

    def all_families(self) -> list[FamilyConfig]:
        return list(self.families) + self.lm_sampler.families()

