"""Meta-training settings: ``metatrain`` (the outer loop), ``pes`` (the estimator), ``inner`` (how each task
trains), ``families`` (one PES population each) and ``lm_sampler`` (language-model families drawn from a seed)."""
from __future__ import annotations

import random
from typing import Annotated, Literal

from pydantic import Field, model_validator

from model.config_base import Bool, ConfigError, Float, Int, Must, config_class
from recipes.config_parsing import load_file
from recipes.metatrain.image_datasets import NAMES as IMAGE_DATASETS
from recipes.optim.config import ThetaSource

FAMILY_KINDS = ("image_mlp", "lm")
PES_OBJECTIVES = ("mean_train_loss", "final_unseen_loss")

Positive = Annotated[Int, Field(gt=0)]
Shape = Annotated[tuple[Positive, ...], Field(min_length=3, max_length=3), Must("[n_layer, d_model, context_length]")]


@config_class("metatrain.")
class OuterConfig:
    outer_steps: Int = Field(100_000, ge=0, description="outer (theta) updates of the run")
    out_dir: Annotated[str, Field(min_length=1), Must("a non-empty path")] = Field(
        "runs/metatrain", description="the run directory; an existing one is resumed")
    init_theta: ThetaSource = Field("normalized_momentum", description="the theta meta-training starts from")
    theta_seed: Int = Field(0, description='the seed of init_theta="random"')
    seed: Int = Field(0, description="the populations' random draws and the families picked per step")
    outer_lr: Float = Field(5e-5, ge=0, description="Adam's learning rate on theta")
    outer_b1: Float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay on theta")
    outer_b2: Float = Field(0.999, ge=0, lt=1, description="Adam's second-moment decay on theta")
    outer_weight_decay: Float = Field(0.0, ge=0, description="decoupled weight decay on theta")
    outer_grad_clip: Float | None = Field(None, gt=0, description="the PES gradient's largest norm; null: no clip")
    checkpoint_every_s: Float = Field(300.0, ge=0, description="seconds between full-state saves (and one at the end)")
    snapshot_every: Int = Field(1000, ge=0, description="outer steps between theta snapshots in thetas/; 0: none")
    log_every: Positive = Field(1, description="outer steps between metrics records")
    profile_every: Int = Field(0, ge=0, description="outer steps between timings of the learned rule; 0: at start")
    profile: Bool = Field(True, description="measure that share at all (false: never)")
    wandb: Literal["disabled", "online", "offline"] = Field("disabled", description="Weights & Biases logging")
    wandb_project: str = Field("celo2-metatrain", description="the W&B project")
    families_per_step: Positive | None = Field(None, description="families drawn for each outer step; null: all")


@config_class("pes.")
class PESConfig:
    particles: Positive = Field(8, description="per family; antithetic pairs, so even")
    sigma: Float = Field(0.01, gt=0, description="the standard deviation of theta's perturbations")
    truncation: Positive = Field(50, description="inner steps per truncation (one outer step)")
    min_length: Positive = Field(100, description="inner-problem lengths are log-uniform in [min_length, max_length]")
    max_length: Positive = Field(2000, description="the longest inner problem")
    loss_cap: Float = Field(1.5, gt=0, description="each step's loss over the task's initial loss is capped "
                            "here (NaN too)")
    objective: Literal[PES_OBJECTIVES] = Field("mean_train_loss", description="a truncation's meta-loss: its steps' "
                                               "losses (published), or the end's on unseen batches")

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

    lr: Float = Field(1e-3, ge=0, description="Celo2's learning rate")
    adamw_lr_mult: Float = Field(20.0, ge=0, description="Adam's learning rate relative to lr")
    b1: Float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay")
    b2: Float = Field(0.95, ge=0, lt=1, description="Adam's second-moment decay")
    weight_decay: Float = Field(0.0, ge=0, description="decoupled weight decay")
    orthogonalize: Bool = Field(True, description="hidden matrices train with celo2 (true) or celo2_base (false)")
    scale_min: Float = Field(1e-3, gt=0, description="each task's parameter scale is log-uniform in [min, max]")
    scale_max: Float = Field(1e3, gt=0, description="the largest such scale")

    @model_validator(mode="after")
    def _scales_ordered(self):
        if self.scale_min > self.scale_max:
            raise ConfigError(f"inner.scale_min ({self.scale_min}) exceeds inner.scale_max ({self.scale_max})")
        return self


def _family_name(values: dict) -> str:
    if values["kind"] == "image_mlp":
        return f"{values['dataset']}_mlp_" + "_".join(map(str, values["hidden"]))
    return f"lm_l{values['n_layer']}_d{values['d_model']}_c{values['context_length']}"


@config_class("families[].")
class FamilyConfig:
    """One task family. image_mlp: an MLP on an 8x8 image set; lm: a small GPT on a token corpus."""

    kind: Literal[FAMILY_KINDS] = Field("image_mlp", description="the task")
    batch: Positive = Field(64, description="examples per inner step")
    weight: Float = Field(1.0, gt=0, description="this family's share of the averaged gradient")
    hidden: tuple[Positive, ...] = Field((64, 32), description="image_mlp: the hidden layers' widths")
    dataset: Literal[IMAGE_DATASETS] = Field("digits", description="image_mlp: the images")
    n_layer: Positive = Field(1, description="lm: transformer blocks")
    n_head: Positive = Field(2, description="lm: attention heads")
    d_model: Positive = Field(32, description="lm: width")
    context_length: Positive = Field(32, description="lm: sequence length")
    vocab: Int = Field(512, ge=2, description='lm: the corpus\'s vocab-1 commonest tokens and "other"')
    corpus: str = Field("", description='lm: a shard directory from data.prepare; "": the bundled Shakespeare')
    name: str = Field(default_factory=_family_name, description="default: named after its kind and shape")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.n_head:
            raise ConfigError(f"families[].d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


@config_class("lm_sampler.")
class LMSamplerConfig:
    """Adds ``count`` lm families of shapes drawn from the choices, or taken in turn from ``shapes``."""

    count: Int = Field(0, ge=0, description="lm families added")
    seed: Int = Field(0, description="the draws' seed")
    n_layer: tuple[Int, ...] = Field((1, 2), min_length=1, description="transformer blocks to draw from")
    d_model: tuple[Int, ...] = Field((32, 64), min_length=1, description="widths to draw from")
    context_length: tuple[Int, ...] = Field((32, 64), min_length=1, description="sequence lengths to draw from")
    n_head: Int = Field(2, description="attention heads of every drawn family")
    batch: Int = Field(8, description="examples per inner step of every drawn family")
    vocab: Int = Field(512, description="the vocabulary of every drawn family")
    shapes: tuple[Shape, ...] = Field((), description="[n_layer, d_model, context_length] triples taken in turn")

    def families(self) -> list[FamilyConfig]:
        """A shape drawn again is a second, independent population (name suffix _2, _3, ...)."""
        rng, shapes = random.Random(self.seed), []
        for i in range(self.count):
            if self.shapes:  # in turn, so each gets count / len(shapes) families
                shapes.append(self.shapes[i % len(self.shapes)])
                continue
            for _attempt in range(100):  # prefer shapes not drawn yet while there are any
                shape = (rng.choice(self.n_layer), rng.choice(self.d_model), rng.choice(self.context_length))
                if shape not in shapes:
                    break
            shapes.append(shape)
        out = []
        for i, (n_layer, d_model, context) in enumerate(shapes):
            copy = shapes[:i].count(shapes[i])  # earlier draws of this shape
            name = f"lm_l{n_layer}_d{d_model}_c{context}" + (f"_{copy + 1}" if copy else "")
            out.append(FamilyConfig(kind="lm", name=name, n_layer=n_layer, d_model=d_model, context_length=context,
                                    n_head=self.n_head, batch=self.batch, vocab=self.vocab))
        return out


@config_class()
class MetaTrainConfig:
    metatrain: OuterConfig = OuterConfig()
    pes: PESConfig = PESConfig()
    inner: InnerConfig = InnerConfig()
    families: tuple[FamilyConfig, ...] = Field((), description="the task families, one PES population each")
    lm_sampler: LMSamplerConfig = LMSamplerConfig()
    from_file = classmethod(load_file)

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
