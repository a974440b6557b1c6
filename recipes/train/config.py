"""A run's settings: ``load_config("shakespeare_celo2.yaml", ["--train.steps=100"])``. Sections: model,
data, optimizer, train, mesh, eval, logging, sample; reading recipes is recipes.config_parsing's."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, model_validator

from model.config import ModelConfig
from model.config_base import Bool, ConfigError, Float, Int, Must, config_class, to_dict
from model.sampling import MAX_NEW_TOKENS
from recipes.config_parsing import load_file
from recipes.optim.config import OptimizerConfig

WANDB_MODES = ("disabled", "offline", "online")


@config_class("data.")
class DataConfig:
    path: str = Field("shakespeare", description="a directory of shards, or shakespeare: the bundled corpus")
    seq_len: Int | None = Field(None, ge=1, description="tokens per training sequence; null: model.context_length")
    global_batch: Int = Field(32, ge=1, description="sequences per optimizer step, summed over all processes")
    micro_batch: Int | None = Field(None, ge=1, description="sequences per forward/backward pass (global), "
                                    "accumulated in one step; null: global_batch")
    seed: Int | None = Field(None, description="order of the training windows; null: train.seed")
    prefetch: Int = Field(2, ge=1, description="batches read ahead")

    @model_validator(mode="after")
    def _micro_batch_divides(self):
        if self.micro_batch is not None and self.global_batch % self.micro_batch:
            raise ConfigError(f"data.global_batch={self.global_batch} is not a multiple of data.micro_batch="
                              f"{self.micro_batch}; pick a micro_batch that divides it")
        return self

    @property
    def micro_batches_per_step(self) -> int:
        return 1 if self.micro_batch is None else self.global_batch // self.micro_batch


@config_class("train.")
class TrainConfig:
    steps: Int = Field(1000, ge=1, description="optimizer steps of the run (and of its schedule)")
    seed: Int = Field(0, description="parameter init (and data order unless data.seed is set)")
    out_dir: str = Field("runs/default", description="the run directory; an existing one is resumed")
    stop_at_step: Int | None = Field(None, description="stop here with a checkpoint (the schedule still spans "
                                     "steps); null: run to steps")
    checkpoint_every: Int = Field(500, ge=1, description="steps between checkpoints")
    keep_checkpoints: Int = Field(3, ge=1, description="checkpoints kept")
    max_nonfinite_steps: Int = Field(5, ge=1, description="stop after this many non-finite steps in a row")
    spike_factor: Annotated[Float | None, Must(hint="null turns the spike guard off")] = Field(
        10.0, gt=1, description="a loss this many times the last 50's median is a spike (no checkpoint until "
        "a clean stretch)")
    target_val_loss: Float | None = Field(None, gt=0, description="record the step, tokens and time at which the "
                                          "validation loss first gets this low")
    stop_at_target: Bool = Field(False, description="end the run (with a checkpoint) once the target is reached")

    @model_validator(mode="after")
    def _stops_are_reachable(self):
        if self.stop_at_target and self.target_val_loss is None:
            raise ConfigError("train.stop_at_target needs train.target_val_loss (the validation loss to reach)")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.steps:
            raise ConfigError(f"train.stop_at_step={self.stop_at_step} must be in [1, train.steps={self.steps}]")
        return self


@config_class("mesh.")
class MeshConfig:
    """Device mesh axes (-1: the remaining devices) and multi-host start. data, fsdp and tensor split a
    host's (a TPU slice's) devices; dcn_data and dcn_fsdp split the hosts or slices. The mesh's data axis
    is dcn_data x data, its fsdp axis dcn_fsdp x fsdp."""

    data: Int = Field(1, description="data-parallel ways inside a host")
    fsdp: Int = Field(-1, description="FSDP ways inside a host")
    tensor: Int = Field(1, description="tensor-parallel ways inside a host")
    dcn_data: Int = Field(-1, description="data-parallel ways across hosts or slices")
    dcn_fsdp: Int = Field(1, description="FSDP ways across hosts or slices")
    devices: Annotated[Int | None, Must(hint="null uses all devices")] = Field(
        None, ge=1, description="the first N devices only; null uses all devices")
    gather_weights: Literal["micro_batch", "step"] = Field("micro_batch", description="when FSDP gathers the "
                                                           "weights; step: once, a whole copy on every device")
    distributed: Literal["auto", True, False] = Field("auto", description="multi-host start; auto: when a cluster "
                                                      "(Slurm, MPI, TPU pod, Kubernetes) launched this process")
    coordinator_address: str | None = Field(None, description="null: found by JAX on those clusters")
    num_processes: Int | None = Field(None, ge=1, description="null: found by JAX")
    process_id: Int | None = Field(None, ge=0, description="null: found by JAX")
    connect_timeout_s: Int = Field(60, ge=1, description="seconds to wait for the coordinator and the other processes")

    @model_validator(mode="after")
    def _axes(self):
        for group in (("data", "fsdp", "tensor"), ("dcn_data", "dcn_fsdp")):
            axes = {name: getattr(self, name) for name in group}
            for name, value in axes.items():
                if value < 1 and value != -1:
                    raise ConfigError(f"mesh.{name} must be an int >= 1, got {value}; or -1 for the remaining devices")
            if list(axes.values()).count(-1) > 1:
                raise ConfigError(f"at most one of {', '.join('mesh.' + n for n in group)} may be -1")
        return self


@config_class("eval.")
class EvalConfig:
    every: Int = Field(100, ge=1, description="steps between validation passes (and one at the end)")
    batches: Int = Field(8, ge=1, description="fixed validation batches (the first ones of the val split)")
    at_start: Bool = Field(True, description="also evaluate the fresh model, so a curve starts at step 0")
    batch_size: Int | None = Field(None, ge=1, description="null: data.micro_batch or data.global_batch")


@config_class("logging.")
class LoggingConfig:
    every: Int = Field(10, ge=1, description="steps between metrics.jsonl and W&B records")
    progress: Bool = Field(True, description="a tqdm progress bar")
    wandb: Literal[WANDB_MODES] = Field("disabled", description="Weights & Biases logging")
    wandb_project: str = Field("celo2-gpt", description="the W&B project")
    wandb_name: str | None = Field(None, description="the W&B run name; null: the run directory's name")
    diagnostics: Bool = Field(False, description="per-branch update statistics (recipes.optim.diagnostics)")


@config_class("sample.")
class SampleConfig:
    """Text generated from the final model, printed after the run's summary."""

    prompt: str = Field("\n", min_length=1, description="the text the sample continues")
    max_new_tokens: Annotated[Int, Must(hint="for a longer text, sample again with the end of this one as its "
                                        "prompt")] = Field(0, ge=0, le=MAX_NEW_TOKENS, description="tokens "
                                                           "generated; 0: no sample")
    temperature: Annotated[Float, Must(hint="0 is greedy")] = Field(0.8, ge=0, description="softmax temperature; "
                                                                     "0 is greedy")
    top_k: Int | None = Field(None, ge=1, description="sample among the k likeliest tokens; null: all")
    seed: Int = Field(0, description="the sampling seed")


@config_class()
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    sample: SampleConfig = SampleConfig()

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.context_length

    @property
    def tokens_per_step(self) -> int:
        return self.data.global_batch * self.seq_len

    @property
    def total_steps(self) -> int:
        """The length the schedule spans: its own total_steps, else train.steps."""
        return self.optimizer.schedule.total_steps or self.train.steps

    @model_validator(mode="after")
    def _fits(self):
        if self.seq_len > self.model.context_length:
            raise ConfigError(f"data.seq_len={self.seq_len} exceeds model.context_length={self.model.context_length}; "
                              "lower data.seq_len or raise the context length")
        return self


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def fit_warmup(config: Config, notes: list[str]) -> Config:
    """``config`` with a warmup that does not fit in the run cut to a tenth of it, and a note appended to ``notes``."""
    schedule = config.optimizer.schedule
    warmup = schedule.fitting_warmup(config.total_steps, notes)
    if warmup == schedule.warmup_steps:
        return config
    fitted = dataclasses.replace(config.optimizer, schedule=dataclasses.replace(schedule, warmup_steps=warmup))
    return dataclasses.replace(config, optimizer=fitted)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                notes: list[str] | None = None) -> Config:
    """The Config from a YAML file (None: the defaults) and overrides, its warmup fitted (fit_warmup)."""
    return fit_warmup(load_file(Config, path, overrides or []), notes if notes is not None else [])
