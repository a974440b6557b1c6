"""Typed optimizer configuration: frozen dataclasses validated on construction.

Recipes select an optimizer by name and override fields from the command
line, e.g. ``--optimizer.name=muon --optimizer.lr=3e-3``. Every check here
fails with a message that names the field, the bad value and a fix.

Defaults that are not from the Celo2 paper are marked "to be swept": they are
nanoGPT-style starting points, not the authors' published settings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, ClassVar, Mapping

from recipes.optim.theta import THETA_NAMES

OPTIMIZER_NAMES = ("celo2", "celo2_base", "muon", "adamw")
SCHEDULE_KINDS = ("cosine", "linear", "constant", "wsd")
WSD_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
ROUTING_GROUPS = ("main", "adamw")  # "main" is the named optimizer's matrix rule (celo2 or muon)

# Parameter paths are the tree's keys joined by "/", e.g. "blocks/attn/qkv/kernel".
DEFAULT_EMBEDDING_PATTERN = r"(^|/)(wte|wpe|lm_head|embedding)(/|$)"
DEFAULT_STACKED_PATTERN = r"^blocks(/|$)"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_regex(owner: str, field: str, pattern) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"{owner}.{field} must be a regex string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{owner}.{field}={pattern!r} is not a valid regex ({error}); fix the pattern") from None


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
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule.kind {self.kind!r}; valid kinds: {list(SCHEDULE_KINDS)}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.total_steps is not None and (not _is_int(self.total_steps) or self.total_steps <= 0):
            raise ValueError(f"schedule.total_steps must be a positive int or None, got {self.total_steps!r}")
        if not _is_number(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"schedule.min_lr_ratio must be in [0, 1] (the floor as a fraction of the peak), got {self.min_lr_ratio!r}"
            )
        if not _is_number(self.decay_fraction) or not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if self.decay_shape not in WSD_DECAY_SHAPES:
            raise ValueError(
                f"unknown schedule.decay_shape {self.decay_shape!r}; valid shapes: {list(WSD_DECAY_SHAPES)}"
            )
        if self.total_steps is not None:
            self.check_steps(self.total_steps)

    def decay_steps(self, total_steps: int) -> int:
        """Length of the WSD decay phase."""
        return max(1, round(self.decay_fraction * total_steps))

    def check_steps(self, total_steps: int) -> None:
        """Refuses a warmup (and WSD decay) that does not fit in ``total_steps``."""
        if self.warmup_steps > total_steps:
            raise ValueError(
                f"schedule.warmup_steps={self.warmup_steps} exceeds total_steps={total_steps}: "
                "shorten the warmup or train longer"
            )
        if self.kind == "wsd" and self.warmup_steps + self.decay_steps(total_steps) > total_steps:
            raise ValueError(
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
        if self.group not in ROUTING_GROUPS:
            raise ValueError(f"routing rule group {self.group!r} is unknown; use one of {list(ROUTING_GROUPS)}")
        if self.pattern is not None:
            _check_regex("routing rule", "pattern", self.pattern)
        for name in ("min_rank", "max_rank"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"routing rule {name} must be an int >= 0 or None, got {value!r}")
        if self.min_rank is not None and self.max_rank is not None and self.min_rank > self.max_rank:
            raise ValueError(f"routing rule min_rank={self.min_rank} > max_rank={self.max_rank}: it can match nothing")
        if self.predicate is not None and not callable(self.predicate):
            raise ValueError(f"routing rule predicate must be callable(path, shape) -> bool, got {self.predicate!r}")

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
            _from_mapping(RoutingRule, r, f"routing.rules[{i}]") if isinstance(r, Mapping) else r
            for i, r in enumerate(self.rules)
        )
        for rule in rules:
            if not isinstance(rule, RoutingRule):
                raise ValueError(f"routing.rules must hold RoutingRule or dicts of its fields, got {rule!r}")
        object.__setattr__(self, "rules", rules)
        _check_regex("routing", "embedding_pattern", self.embedding_pattern)
        _check_regex("routing", "stacked_pattern", self.stacked_pattern)
        if not _is_int(self.stacked_axes) or self.stacked_axes < 0:
            raise ValueError(f"routing.stacked_axes must be an int >= 0, got {self.stacked_axes!r}")
        if not _is_int(self.adamw_max_rank) or self.adamw_max_rank < 0:
            raise ValueError(f"routing.adamw_max_rank must be an int >= 0, got {self.adamw_max_rank!r}")


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
        if not _is_number(self.beta) or not 0.0 <= self.beta < 1.0:
            raise ValueError(f"muon.beta must be in [0, 1), got {self.beta!r}")
        if not _is_int(self.ns_steps) or self.ns_steps < 1:
            raise ValueError(f"muon.ns_steps must be an int >= 1, got {self.ns_steps!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"muon.nesterov must be a bool, got {self.nesterov!r}")
        if self.consistent_rms is not None and (not _is_number(self.consistent_rms) or self.consistent_rms <= 0):
            raise ValueError(f"muon.consistent_rms must be a positive number or None, got {self.consistent_rms!r}")


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
                object.__setattr__(self, field, _from_mapping(cls, value, f"optimizer.{field}"))
            elif not isinstance(value, cls):
                raise ValueError(f"optimizer.{field} must be a {cls.__name__} or a dict of its fields, got {value!r}")
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer name {self.name!r}; valid names: {list(OPTIMIZER_NAMES)}")
        for field in ("lr", "weight_decay", "adamw_lr_mult"):
            self._check_non_negative(field, getattr(self, field))
        if self.adamw_lr is not None:
            self._check_non_negative("adamw_lr", self.adamw_lr)
        for field in ("b1", "b2"):
            value = getattr(self, field)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"optimizer.{field} must be in [0, 1), got {value!r}")
        if not _is_number(self.eps) or self.eps <= 0:
            raise ValueError(f"optimizer.eps must be a positive number, got {self.eps!r}")
        if not isinstance(self.theta, str) or not self.theta:
            raise ValueError(
                f"optimizer.theta must be a path, hf://OWNER/REPO or one of {list(THETA_NAMES)}, got {self.theta!r}"
            )
        if not _is_int(self.theta_seed):
            raise ValueError(f"optimizer.theta_seed must be an int, got {self.theta_seed!r}")
        if self.grad_clip_norm is not None and (not _is_number(self.grad_clip_norm) or self.grad_clip_norm <= 0):
            raise ValueError(
                f"optimizer.grad_clip_norm must be a positive number or None (no clipping), got {self.grad_clip_norm!r}"
            )
        if not isinstance(self.decay_rank1, bool):
            raise ValueError(f"optimizer.decay_rank1 must be a bool, got {self.decay_rank1!r}")
        if not _is_int(self.grad_accum_steps) or self.grad_accum_steps < 1:
            raise ValueError(f"optimizer.grad_accum_steps must be an int >= 1, got {self.grad_accum_steps!r}")

    @staticmethod
    def _check_non_negative(field: str, value) -> None:
        if not _is_number(value):
            raise ValueError(f"optimizer.{field} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"optimizer.{field} must be >= 0, got {value!r}: use a positive value")

    @property
    def side_lr(self) -> float:
        """Peak LR of the AdamW side branch of celo2 and muon."""
        return self.adamw_lr if self.adamw_lr is not None else self.adamw_lr_mult * self.lr

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OptimizerConfig:
        """Builds a config from nested dicts (e.g. parsed YAML or OmegaConf), refusing unknown keys."""
        return _from_mapping(cls, values, "optimizer")

    def to_dict(self) -> dict:
        """Nested plain dict of the fields (routing predicates stay callables)."""
        return dataclasses.asdict(self)


def renamed_keys(cls, values: Mapping[str, Any]) -> dict:
    """``values`` with keys a dataclass has renamed (its RENAMED_KEYS) under their current names."""
    renamed = getattr(cls, "RENAMED_KEYS", {})
    return {(renamed[key] if key in renamed and renamed[key] not in values else key): value
            for key, value in values.items()}


def _from_mapping(cls, values: Mapping[str, Any], where: str):
    values = renamed_keys(cls, values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} field(s) {unknown}; known fields: {sorted(known)}")
    values = dict(values)
    if cls is OptimizerConfig:
        for field, nested in _NESTED.items():
            if isinstance(values.get(field), Mapping):
                values[field] = _from_mapping(nested, values[field], f"{where}.{field}")
    if cls is RoutingConfig and "rules" in values:
        rules = []
        for i, rule in enumerate(values["rules"]):
            rules.append(_from_mapping(RoutingRule, rule, f"{where}.rules[{i}]") if isinstance(rule, Mapping) else rule)
        values["rules"] = tuple(rules)
    return cls(**values)
