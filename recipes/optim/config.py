"""Typed optimizer configuration: frozen dataclasses validated on construction.

Recipes select an optimizer by name and override fields from the command
line, e.g. ``--optimizer.name=muon --optimizer.lr=3e-3``. Every check here
fails with a message that names the field, the bad value and a fix.

Defaults that are not from the Celo2 paper are marked "to be swept": they are
nanoGPT-style starting points, not the authors' published settings.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, ClassVar, Mapping

from recipes.config_parsing import dataclass_from_dict
from recipes.errors import ConfigError, check_bool, check_choice, check_number
from recipes.optim.theta import THETA_NAMES

OPTIMIZER_NAMES = ("celo2", "celo2_base", "muon", "adamw")
SCHEDULE_KINDS = ("cosine", "linear", "constant", "wsd")
WSD_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
ROUTING_GROUPS = ("main", "adamw")  # "main" is the named optimizer's matrix rule (celo2 or muon)

# Parameter paths are the tree's keys joined by "/", e.g. "blocks/attn/qkv/kernel".
DEFAULT_EMBEDDING_PATTERN = r"(^|/)(wte|wpe|lm_head|embedding)(/|$)"
DEFAULT_STACKED_PATTERN = r"^blocks(/|$)"


def _check_regex(owner: str, field: str, pattern) -> None:
    if not isinstance(pattern, str):
        raise ConfigError(f"{owner}.{field} must be a regex string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"{owner}.{field}={pattern!r} is not a valid regex ({error}); fix the pattern") from None


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate shape over training; the peak comes from OptimizerConfig.

    Every kind starts with ``warmup_steps`` of linear warmup from 0 to the peak
    (step 0 has LR 0; the optimizer's statistics still take that gradient in).
      cosine:   cosine decay to ``min_lr_ratio * peak`` at ``total_steps``.
      linear:   linear decay to ``min_lr_ratio * peak`` at ``total_steps``.
      constant: the peak until the end (``total_steps`` unused).
      wsd:      warmup-stable-decay: the peak until the last ``decay_fraction``
                of ``total_steps``, then ``decay_shape`` down to the floor.
    ``total_steps=None`` takes the trainer's step count (passed to the builder).
    """

    kind: str = "cosine"
    warmup_steps: int = 0
    total_steps: int | None = None
    # nanoGPT decays to lr/10; to be swept.
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "linear"

    def __post_init__(self):
        check_choice("schedule.kind", self.kind, SCHEDULE_KINDS)
        check_number("schedule.warmup_steps", self.warmup_steps, integer=True, low=0)
        check_number("schedule.total_steps", self.total_steps, integer=True, low=0, low_open=True, optional=True)
        check_number("schedule.min_lr_ratio", self.min_lr_ratio, low=0, high=1,
                     hint="the floor as a fraction of the peak")
        check_number("schedule.decay_fraction", self.decay_fraction, low=0, high=1, low_open=True)
        check_choice("schedule.decay_shape", self.decay_shape, WSD_DECAY_SHAPES)
        if self.total_steps is not None:
            self.check_steps(self.total_steps)

    def decay_steps(self, total_steps: int) -> int:
        """Length of the WSD decay phase."""
        return max(1, round(self.decay_fraction * total_steps))

    def check_steps(self, total_steps: int) -> None:
        """Refuses a warmup (and WSD decay) that does not fit in ``total_steps``."""
        if self.warmup_steps > total_steps:
            raise ConfigError(
                f"schedule.warmup_steps={self.warmup_steps} exceeds total_steps={total_steps}: "
                "shorten the warmup or train longer"
            )
        if self.kind == "wsd" and self.warmup_steps + self.decay_steps(total_steps) > total_steps:
            raise ConfigError(
                f"schedule: warmup ({self.warmup_steps}) plus WSD decay ({self.decay_steps(total_steps)} = "
                f"decay_fraction {self.decay_fraction} of {total_steps}) exceeds total_steps={total_steps}; "
                "lower warmup_steps or decay_fraction"
            )


@dataclasses.dataclass(frozen=True)
class RoutingRule:
    """Sends the parameters it matches to a group: "main" (the named optimizer's matrix rule,
    celo2 or muon) or "adamw". The partition label a group gets (celo2, muon, adamw, ...) is
    the branch; recipes.optim.optimizers.branch_of names it.

    A parameter matches when every given condition holds: ``pattern`` is found
    (re.search) in its "/"-joined path, its logical rank (leading layer axis
    excluded) is within [min_rank, max_rank], and ``predicate(path, shape)``
    is true. A rule with no condition matches everything.
    """

    # Settings saved before "group" was named "branch" (run directories' config.yaml) still load.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"branch": "group"}

    group: str
    pattern: str | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    predicate: Callable[[str, tuple], bool] | None = None

    def __post_init__(self):
        check_choice("routing rule group", self.group, ROUTING_GROUPS)
        if self.pattern is not None:
            _check_regex("routing rule", "pattern", self.pattern)
        for name in ("min_rank", "max_rank"):
            check_number(f"routing rule {name}", getattr(self, name), integer=True, low=0, optional=True)
        if self.min_rank is not None and self.max_rank is not None and self.min_rank > self.max_rank:
            raise ConfigError(f"routing rule min_rank={self.min_rank} > max_rank={self.max_rank}: it can match nothing")
        if self.predicate is not None and not callable(self.predicate):
            raise ConfigError(f"routing rule predicate must be callable(path, shape) -> bool, got {self.predicate!r}")

    def describe(self) -> str:
        parts = [f"pattern={self.pattern!r}"] if self.pattern is not None else []
        if self.min_rank is not None:
            parts.append(f"rank>={self.min_rank}")
        if self.max_rank is not None:
            parts.append(f"rank<={self.max_rank}")
        if self.predicate is not None:
            parts.append(f"predicate={getattr(self.predicate, '__name__', 'fn')}")
        return f"{' '.join(parts) or 'all'} -> {self.group}"


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """Which parameters the matrix rule gets and which go to AdamW.

    ``rules`` are tried in order and the first match wins; parameters no rule
    matches follow the authors' default: an embedding (``embedding_pattern``)
    or logical rank <= ``adamw_max_rank`` goes to AdamW, anything else to the
    "main" group. Parameters whose path matches ``stacked_pattern`` carry
    ``stacked_axes`` leading layer axes that are not part of their rank.
    """

    rules: tuple[RoutingRule, ...] = ()
    embedding_pattern: str = DEFAULT_EMBEDDING_PATTERN
    stacked_pattern: str = DEFAULT_STACKED_PATTERN
    stacked_axes: int = 1
    adamw_max_rank: int = 1

    def __post_init__(self):
        rules = tuple(
            dataclass_from_dict(RoutingRule, r, f"routing.rules[{i}]") if isinstance(r, Mapping) else r
            for i, r in enumerate(self.rules)
        )
        for rule in rules:
            if not isinstance(rule, RoutingRule):
                raise ConfigError(f"routing.rules must hold RoutingRule or dicts of its fields, got {rule!r}")
        object.__setattr__(self, "rules", rules)
        _check_regex("routing", "embedding_pattern", self.embedding_pattern)
        _check_regex("routing", "stacked_pattern", self.stacked_pattern)
        check_number("routing.stacked_axes", self.stacked_axes, integer=True, low=0)
        check_number("routing.adamw_max_rank", self.adamw_max_rank, integer=True, low=0)


@dataclasses.dataclass(frozen=True)
class MuonConfig:
    """Settings of the muon baseline's matrix branch (optax.contrib.muon)."""

    beta: float = 0.95
    ns_steps: int = 5
    nesterov: bool = True
    # None: Muon's width scaling sqrt(max(1, fan_out/fan_in)); a float c scales the
    # orthogonalized step to RMS about c, like AdamW's (c=0.2 is Moonlight's choice).
    consistent_rms: float | None = None

    def __post_init__(self):
        check_number("muon.beta", self.beta, low=0, high=1, high_open=True)
        check_number("muon.ns_steps", self.ns_steps, integer=True, low=1)
        check_bool("muon.nesterov", self.nesterov)
        check_number("muon.consistent_rms", self.consistent_rms, low=0, low_open=True, optional=True)


_NESTED = {"schedule": ScheduleConfig, "routing": RoutingConfig, "muon": MuonConfig}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer harness, selected by ``name`` (one of OPTIMIZER_NAMES).

    Learning rates: ``lr`` is the peak LR of the main branch (celo2's or muon's
    hidden matrices); for ``adamw`` and ``celo2_base`` it is the LR of every
    parameter. The AdamW side branch of celo2/muon uses ``adamw_lr`` if set,
    else ``adamw_lr_mult * lr``. Both follow the same schedule shape.

    Weight decay is decoupled (update -lr * (step + weight_decay * p)) and
    applied in every branch; ``decay_rank1=False`` exempts logical rank <= 1
    parameters (biases, LayerNorm), the nanoGPT convention.
    """

    name: str = "celo2"
    # Peak LR; to be swept (no value is taken from the paper).
    lr: float = 1e-3
    # nanoGPT's value; to be swept.
    weight_decay: float = 0.1
    # The AdamW side branch's LR relative to lr. 1.0 is a neutral start, not the
    # paper's value: sweep it (Celo2 steps have RMS 1, AdamW's are smaller).
    adamw_lr_mult: float = 1.0
    adamw_lr: float | None = None
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # A theta.state path, a directory holding one, hf://OWNER/REPO, or one of THETA_NAMES.
    theta: str = "hf://amoudgl/celo2"
    theta_seed: int = 0  # for theta="random"
    grad_clip_norm: float | None = None
    decay_rank1: bool = True
    # > 1 wraps the optimizer in optax.MultiSteps; leave 1 when the trainer accumulates.
    grad_accum_steps: int = 1
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    routing: RoutingConfig = dataclasses.field(default_factory=RoutingConfig)
    muon: MuonConfig = dataclasses.field(default_factory=MuonConfig)

    def __post_init__(self):
        for field, cls in _NESTED.items():
            value = getattr(self, field)
            if isinstance(value, Mapping):
                object.__setattr__(self, field, dataclass_from_dict(cls, value, f"optimizer.{field}"))
            elif not isinstance(value, cls):
                raise ConfigError(f"optimizer.{field} must be a {cls.__name__} or a dict of its fields, got {value!r}")
        check_choice("optimizer.name", self.name, OPTIMIZER_NAMES)
        for field in ("lr", "weight_decay", "adamw_lr_mult", "adamw_lr"):
            check_number(f"optimizer.{field}", getattr(self, field), low=0, optional=field == "adamw_lr")
        for field in ("b1", "b2"):
            check_number(f"optimizer.{field}", getattr(self, field), low=0, high=1, high_open=True)
        check_number("optimizer.eps", self.eps, low=0, low_open=True)
        if not isinstance(self.theta, str) or not self.theta:
            raise ConfigError(
                f"optimizer.theta must be a path, hf://OWNER/REPO or one of {list(THETA_NAMES)}, got {self.theta!r}"
            )
        check_number("optimizer.theta_seed", self.theta_seed, integer=True)
        check_number("optimizer.grad_clip_norm", self.grad_clip_norm, low=0, low_open=True, optional=True,
                     hint="null is no clipping")
        check_bool("optimizer.decay_rank1", self.decay_rank1)
        check_number("optimizer.grad_accum_steps", self.grad_accum_steps, integer=True, low=1)

    @property
    def side_lr(self) -> float:
        """Peak LR of the AdamW side branch of celo2 and muon."""
        return self.adamw_lr if self.adamw_lr is not None else self.adamw_lr_mult * self.lr

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OptimizerConfig:
        """Builds a config from nested dicts (e.g. parsed YAML or OmegaConf), refusing unknown keys."""
        return dataclass_from_dict(cls, values, "optimizer")

    def to_dict(self) -> dict:
        """Nested plain dict of the fields (routing predicates stay callables)."""
        return dataclasses.asdict(self)
