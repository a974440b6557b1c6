"""One typed run config: YAML file + command-line overrides -> frozen dataclasses.

    config = load_config("shakespeare_celo2.yaml", ["--optimizer.lr=3e-3", "--train.steps=100"])

Sections: model (a named size plus ModelConfig overrides), data, optimizer
(recipes.optim.config.OptimizerConfig), train, mesh, eval, logging. A YAML
file may name another with ``base: other.yaml`` (relative to the file); its keys
are merged under the file's own. Top-level keys starting with "_" are ignored, so
they can hold YAML anchors. Reading and checking keys is recipes.config_parsing's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml

from model.config import ModelConfig
from recipes.errors import ConfigError, check_choice, check_number
from recipes.optim.config import OptimizerConfig, ScheduleConfig
from recipes.config_parsing import dataclass_from_dict, merge_configs, parse_overrides, read_yaml, to_dict

WANDB_MODES = ("disabled", "offline", "online")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "shakespeare" (the bundled corpus, prepared on first use) or a directory of shards.
    path: str = "shakespeare"
    seq_len: int | None = None  # None: the model's context_length
    global_batch: int = 32  # sequences per optimizer step, summed over all processes
    # Sequences per forward/backward pass (global); global_batch / micro_batch passes are
    # accumulated inside one jitted step. None: no accumulation.
    micro_batch: int | None = None
    seed: int | None = None  # order of the training windows; None: train.seed
    prefetch: int = 2

    def __post_init__(self):
        for name in ("global_batch", "prefetch", "seq_len", "micro_batch"):
            check_number(f"data.{name}", getattr(self, name), integer=True, low=1,
                         optional=name in ("seq_len", "micro_batch"))
        if self.micro_batch is not None and self.global_batch % self.micro_batch:
            raise ConfigError(
                f"data.global_batch={self.global_batch} is not a multiple of data.micro_batch="
                f"{self.micro_batch}; pick a micro_batch that divides it")

    @property
    def micro_batches_per_step(self) -> int:
        return 1 if self.micro_batch is None else self.global_batch // self.micro_batch


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0  # parameter init (and data order unless data.seed is set)
    out_dir: str = "runs/default"  # the run directory; an existing one is resumed
    # Stop early at this step with a checkpoint (the schedule still spans `steps`),
    # e.g. to split a run across jobs. None: run to `steps`.
    stop_at_step: int | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # Stop after this many consecutive non-finite steps (each is skipped).
    max_nonfinite_steps: int = 5
    # A step whose loss exceeds this many times the median of the last 50 is a spike. A checkpoint
    # is written only when every step since the previous one was finite and spike-free, so the
    # checkpoints always hold a state the run trusts. null: no spike guard.
    spike_factor: float | None = 10.0
    # Steps to a target: the first evaluation at or below this validation loss records its step,
    # tokens and training wall time (metrics.jsonl and summary.json). null: no target.
    target_val_loss: float | None = None
    stop_at_target: bool = False  # end the run (with a checkpoint) once the target is reached

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
            check_number(f"train.{name}", getattr(self, name), integer=True, low=1)
        if self.stop_at_target and self.target_val_loss is None:
            raise ConfigError("train.stop_at_target needs train.target_val_loss (the validation loss to reach)")
        check_number("train.target_val_loss", self.target_val_loss, low=0, low_open=True, optional=True)
        check_number("train.spike_factor", self.spike_factor, low=1, low_open=True, optional=True,
                     hint="null turns the spike guard off")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.steps:
            raise ConfigError(
                f"train.stop_at_step={self.stop_at_step} must be in [1, train.steps={self.steps}]")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes (-1 takes the remaining devices) and multi-host setup."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    devices: int | None = None  # use only the first N devices (None: all of them)
    # Multi-host: call jax.distributed.initialize. Unset fields are auto-detected by JAX
    # on clusters it knows (SLURM, TPU pods, ...).
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if value != -1:
                check_number(f"mesh.{name}", value, integer=True, low=1, hint="or -1 for the remaining devices")
        check_number("mesh.devices", self.devices, integer=True, low=1, optional=True, hint="null uses all devices")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 100  # steps between validation passes (and one at the end)
    batches: int = 8  # fixed validation batches (the first ones of the val split)
    at_start: bool = True  # also evaluate the fresh model, so a curve starts at step 0
    batch_size: int | None = None  # None: data.micro_batch or data.global_batch

    def __post_init__(self):
        for name in ("every", "batches", "batch_size"):
            check_number(f"eval.{name}", getattr(self, name), integer=True, low=1, optional=name == "batch_size")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every: int = 10  # steps between metrics.jsonl / W&B records
    progress: bool = True  # tqdm progress bar
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "celo2-gpt"
    wandb_name: str | None = None  # None: the run directory's name
    diagnostics: bool = False  # per-branch update statistics (recipes.optim.diagnostics)

    def __post_init__(self):
        check_number("logging.every", self.every, integer=True, low=1)
        check_choice("logging.wandb", self.wandb, WANDB_MODES)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Text generated from the final model, printed after the run's summary (0 tokens: none)."""

    prompt: str = "\n"
    max_new_tokens: int = 0
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self):
        check_number("sample.max_new_tokens", self.max_new_tokens, integer=True, low=0)
        check_number("sample.temperature", self.temperature, low=0, hint="0 is greedy")
        check_number("sample.top_k", self.top_k, integer=True, low=1, optional=True)
        if not self.prompt:
            raise ConfigError("sample.prompt is empty: give at least one character")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig.named("tiny"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.context_length

    @property
    def tokens_per_step(self) -> int:
        return self.data.global_batch * self.seq_len

    def __post_init__(self):
        if self.seq_len > self.model.context_length:
            raise ConfigError(
                f"data.seq_len={self.seq_len} exceeds model.context_length="
                f"{self.model.context_length}; lower data.seq_len or raise the context length")
        try:  # the schedule must fit in the run (train.steps when the schedule names no length)
            self.optimizer.schedule.check_steps(self.optimizer.schedule.total_steps or self.train.steps)
        except ConfigError as error:
            raise ConfigError(f"optimizer.{error}") from None


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def build_config(values: Mapping[str, Any]) -> Config:
    """The typed Config from a plain nested dict (sections as mappings)."""
    values = dict(values)
    for name, section in values.items():
        if name in {f.name for f in dataclasses.fields(Config)} and not isinstance(section, Mapping):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {section!r}")
    model = values.get("model", {})
    if "size" not in model and not set(model) & {"n_layer", "d_model"}:
        values["model"] = {"size": "tiny", **model}
    return dataclass_from_dict(Config, values)


def fit_warmup(values: dict) -> tuple[dict, str | None]:
    """A warmup that does not fit in a short run (``--train.steps=10`` on a recipe with 20) is cut to a
    tenth of the run, so quick tries need no second override; returns the values and a note saying so."""
    schedule = dict((values.get("optimizer") or {}).get("schedule") or {})
    warmup = schedule.get("warmup_steps")
    total = schedule.get("total_steps") or (values.get("train") or {}).get("steps", TrainConfig.steps)
    if not isinstance(warmup, int) or not isinstance(total, int) or total <= 0 or warmup < 0:
        return values, None  # malformed values: the typed config says what is wrong
    decay = 0
    fraction = schedule.get("decay_fraction", ScheduleConfig.decay_fraction)
    if schedule.get("kind") == "wsd" and isinstance(fraction, (int, float)):
        decay = max(1, round(fraction * total))  # as ScheduleConfig.decay_steps
    if warmup + decay <= total:
        return values, None
    fitted = min(total // 10, total - decay)
    optimizer = {**values["optimizer"], "schedule": {**schedule, "warmup_steps": max(fitted, 0)}}
    note = (f"note: optimizer.schedule.warmup_steps={warmup} does not fit in {total} steps; "
            f"using {max(fitted, 0)} (a tenth of the run)")
    return {**values, "optimizer": optimizer}, note


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                notes: list[str] | None = None) -> Config:
    """The typed Config from a YAML file (or defaults when None) and command-line overrides.

    Adjustments made on the way (a warmup cut to fit a short run) are appended to ``notes``.
    """
    values = read_yaml(path) if path is not None else {}
    values, note = fit_warmup(merge_configs(values, parse_overrides(list(overrides or []))))
    if note and notes is not None:
        notes.append(note)
    return build_config(values)
