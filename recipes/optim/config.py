"""The optimizer's settings, e.g. ``--optimizer.name=muon --optimizer.lr=3e-3``. Defaults marked "to be
swept" are nanoGPT-style starting points, not the Celo2 authors' settings."""
from __future__ import annotations

import re
from typing import Annotated, Callable, Literal

from pydantic import AliasChoices, Field, model_validator

from model.config_base import Bool, ConfigError, Float, Int, Must, config_class
from recipes.optim.theta import THETA_NAMES

OPTIMIZER_NAMES = ("celo2", "celo2_base", "muon", "adamw")
SCHEDULE_KINDS = ("cosine", "linear", "constant", "wsd")
WSD_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
ROUTING_GROUPS = ("main", "adamw")  # "main" is the named optimizer's matrix rule (celo2 or muon)

# Parameter paths are the tree's keys joined by "/", e.g. "blocks/attn/qkv/kernel".
DEFAULT_EMBEDDING_PATTERN = r"(^|/)(wte|wpe|lm_head|embedding)(/|$)"
DEFAULT_STACKED_PATTERN = r"^blocks(/|$)"

ThetaSource = Annotated[str, Field(min_length=1), Must(f"a path, hf://OWNER/REPO or one of {list(THETA_NAMES)}")]


def _check_regex(owner: str, field: str, pattern) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"{owner}.{field}={pattern!r} is not a valid regex ({error}); fix the pattern") from None


@config_class("schedule.")
class ScheduleConfig:
    """Learning-rate shape over training (the peak is OptimizerConfig's), after a linear warmup from 0."""

    kind: Literal[SCHEDULE_KINDS] = Field("cosine", description="decay to the floor at total_steps; wsd: the peak, "
                                          "then decay_shape over the last decay_fraction")
    warmup_steps: Int = Field(0, ge=0, description="steps of linear warmup from 0 to the peak")
    total_steps: Int | None = Field(None, gt=0, description="the length the schedule spans; null: the run's steps")
    min_lr_ratio: Annotated[Float, Must(hint="the floor as a fraction of the peak")] = Field(
        0.1, ge=0, le=1, description="the floor as a fraction of the peak (nanoGPT's; to be swept)")
    decay_fraction: Float = Field(0.2, gt=0, le=1, description="wsd: the share of total_steps spent decaying")
    decay_shape: Literal[WSD_DECAY_SHAPES] = Field("linear", description="wsd: the decay's shape")

    def decay_steps(self, total_steps: int) -> int:
        """Length of the WSD decay phase."""
        return max(1, round(self.decay_fraction * total_steps))

    def fitting_warmup(self, total_steps: int, notes: list[str] | None = None) -> int:
        """warmup_steps if it (and a WSD decay) fits in ``total_steps``. If not: given ``notes`` (a run's config
        being loaded), a tenth of the run and a note, so --train.steps=10 needs no second override; else (a
        schedule being built) a ConfigError."""
        decay = self.decay_steps(total_steps) if self.kind == "wsd" else 0
        if self.warmup_steps + decay <= total_steps:
            return self.warmup_steps
        if notes is None and self.warmup_steps > total_steps:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps} exceeds total_steps={total_steps}: shorten "
                              "the warmup or train longer")
        if notes is None:
            raise ConfigError(f"schedule: warmup ({self.warmup_steps}) plus WSD decay ({decay} = decay_fraction "
                              f"{self.decay_fraction} of {total_steps}) exceeds total_steps={total_steps}; lower "
                              "warmup_steps or decay_fraction")
        fitted = max(min(total_steps // 10, total_steps - decay), 0)
        notes.append(f"note: optimizer.schedule.warmup_steps={self.warmup_steps} does not fit in {total_steps} "
                     f"steps; using {fitted} (a tenth of the run)")
        return fitted


@config_class("routing rule ")
class RoutingRule:
    """Sends the parameters that meet all its conditions to a group (none: every parameter)."""

    # Run directories saved before "group" was named "branch" still load.
    group: Literal[ROUTING_GROUPS] = Field(validation_alias=AliasChoices("group", "branch"), description=(
        "main (the named optimizer's matrix rule) or adamw"))
    pattern: str | None = Field(None, description='a regex found (re.search) in the parameter\'s "/"-joined path')
    min_rank: Int | None = Field(None, ge=0, description="the least logical rank (leading layer axis excluded)")
    max_rank: Int | None = Field(None, ge=0, description="the greatest logical rank")
    predicate: Callable[[str, tuple], bool] | None = Field(None, description="predicate(path, shape) (from Python)")

    @model_validator(mode="after")
    def _can_match(self):
        if self.pattern is not None:
            _check_regex("routing rule", "pattern", self.pattern)
        if self.min_rank is not None and self.max_rank is not None and self.min_rank > self.max_rank:
            raise ConfigError(f"routing rule min_rank={self.min_rank} > max_rank={self.max_rank}: it can match nothing")
        return self


@config_class("routing.")
class RoutingConfig:
    """Which parameters the matrix rule gets and which go to AdamW."""

    rules: tuple[RoutingRule, ...] = Field((), description="the first that matches wins; else embeddings and "
                                           "rank <= adamw_max_rank go to adamw, the rest to main")
    embedding_pattern: str = Field(DEFAULT_EMBEDDING_PATTERN, description="paths of embeddings")
    stacked_pattern: str = Field(DEFAULT_STACKED_PATTERN, description="paths of parameters with leading layer axes")
    stacked_axes: Int = Field(1, ge=0, description="leading layer axes of those, not part of their rank")
    adamw_max_rank: Int = Field(1, ge=0, description="unmatched parameters of at most this logical rank go to AdamW")

    @model_validator(mode="after")
    def _patterns_compile(self):
        _check_regex("routing", "embedding_pattern", self.embedding_pattern)
        _check_regex("routing", "stacked_pattern", self.stacked_pattern)
        return self


@config_class("muon.")
class MuonConfig:
    """Settings of the muon baseline's matrix branch (optax.contrib.muon)."""

    beta: Float = Field(0.95, ge=0, lt=1, description="momentum")
    ns_steps: Int = Field(5, ge=1, description="Newton-Schulz iterations")
    nesterov: Bool = Field(True, description="Nesterov momentum")
    consistent_rms: Float | None = Field(None, gt=0, description="steps of RMS about this (Moonlight: 0.2); null: "
                                         "Muon's sqrt(max(1, fan_out/fan_in))")


@config_class("optimizer.")
class OptimizerConfig:
    """The optimizer harness, selected by ``name``. Weight decay is decoupled (-lr * (step + weight_decay * p))
    in every branch; both branches' LRs follow the schedule's shape."""

    name: Literal[OPTIMIZER_NAMES] = Field("celo2", description="the matrix rule; adamw, celo2_base: every parameter")
    lr: Float = Field(1e-3, ge=0, description="peak LR of the main branch (of every parameter for adamw, celo2_base)")
    weight_decay: Float = Field(0.1, ge=0, description="decoupled weight decay (nanoGPT's value; to be swept)")
    adamw_lr_mult: Float = Field(1.0, ge=0, description="the AdamW side branch's LR relative to lr (to be swept)")
    adamw_lr: Float | None = Field(None, ge=0, description="the AdamW side branch's peak LR; null: adamw_lr_mult * lr")
    b1: Float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay")
    b2: Float = Field(0.95, ge=0, lt=1, description="Adam's second-moment decay")
    eps: Float = Field(1e-8, gt=0, description="Adam's epsilon")
    theta: ThetaSource = Field("hf://amoudgl/celo2", description="Celo2's learned weights")
    theta_seed: Int = Field(0, description='the seed of theta="random"')
    grad_clip_norm: Annotated[Float | None, Must(hint="null is no clipping")] = Field(
        None, gt=0, description="the largest global gradient norm; null is no clipping")
    decay_rank1: Bool = Field(True, description="false: biases and LayerNorms get no weight decay (nanoGPT's way)")
    schedule: ScheduleConfig = ScheduleConfig()
    routing: RoutingConfig = RoutingConfig()
    muon: MuonConfig = MuonConfig()

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, values):
        # Gradient accumulation is data.micro_batch's alone; run configs saved before still load.
        if isinstance(values, dict) and values.get("grad_accum_steps", 1) != 1:
            raise ConfigError(f"optimizer.grad_accum_steps={values['grad_accum_steps']!r} is no longer read: "
                              "accumulate inside one step instead, with data.global_batch and data.micro_batch")
        return {k: v for k, v in values.items() if k != "grad_accum_steps"} if isinstance(values, dict) else values

    @property
    def side_lr(self) -> float:
        """Peak LR of the AdamW side branch of celo2 and muon."""
        return self.adamw_lr if self.adamw_lr is not None else self.adamw_lr_mult * self.lr
