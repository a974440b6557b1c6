"""One typed run config: YAML file + command-line overrides -> frozen config classes.

    config = load_config("shakespeare_celo2.yaml", ["--optimizer.lr=3e-3", "--train.steps=100"])

Sections: model (a named size plus ModelConfig overrides), data, optimizer
(recipes.optim.config.OptimizerConfig), train, mesh, eval, logging, sample. A YAML
file may name another with ``base: other.yaml`` (relative to the file); its keys
are merged under the file's own. Top-level keys starting with "_" are ignored, so
they can hold YAML anchors. Reading and checking keys is recipes.config_parsing's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationInfo, model_validator

from model.config import ModelConfig
from model.sampling import MAX_NEW_TOKENS
from recipes.config_parsing import Bool, Float, Int, config_class, to_dict
from recipes.errors import ConfigError, check_number
from recipes.optim.config import WARMUP_NOTES, OptimizerConfig

WANDB_MODES = ("disabled", "offline", "online")


@config_class("data.")
class DataConfig:
    # "shakespeare" (the bundled corpus, prepared on first use) or a directory of shards.
    path: str = "shakespeare"
    seq_len: Int | None = Field(None, ge=1)  # None: the model's context_length
    global_batch: Int = Field(32, ge=1)  # sequences per optimizer step, summed over all processes
    # Sequences per forward/backward pass (global); global_batch / micro_batch passes are
    # accumulated inside one jitted step. None: no accumulation.
    micro_batch: Int | None = Field(None, ge=1)
    seed: Int | None = None  # order of the training windows; None: train.seed
    prefetch: Int = Field(2, ge=1)

    @model_validator(mode="after")
    def _micro_batch_divides(self):
        if self.micro_batch is not None and self.global_batch % self.micro_batch:
            raise ConfigError(
                f"data.global_batch={self.global_batch} is not a multiple of data.micro_batch="
                f"{self.micro_batch}; pick a micro_batch that divides it")
        return self

    @property
    def micro_batches_per_step(self) -> int:
        return 1 if self.micro_batch is None else self.global_batch // self.micro_batch


@config_class("train.")
class TrainConfig:
    steps: Int = Field(1000, ge=1)
    seed: Int = 0  # parameter init (and data order unless data.seed is set)
    out_dir: str = "runs/default"  # the run directory; an existing one is resumed
    # Stop early at this step with a checkpoint (the schedule still spans `steps`),
    # e.g. to split a run across jobs. None: run to `steps`.
    stop_at_step: Int | None = None
    checkpoint_every: Int = Field(500, ge=1)
    keep_checkpoints: Int = Field(3, ge=1)
    # Stop after this many consecutive non-finite steps (each is skipped).
    max_nonfinite_steps: Int = Field(5, ge=1)
    # A step whose loss exceeds this many times the median of the last 50 is a spike. A checkpoint
    # is written only when every step since the previous one was finite and spike-free, so the
    # checkpoints always hold a state the run trusts. null: no spike guard.
    spike_factor: Float | None = Field(10.0, gt=1, description="null turns the spike guard off")
    # Steps to a target: the first evaluation at or below this validation loss records its step,
    # tokens and training wall time (metrics.jsonl and summary.json). null: no target.
    target_val_loss: Float | None = Field(None, gt=0)
    stop_at_target: Bool = False  # end the run (with a checkpoint) once the target is reached

    @model_validator(mode="after")
    def _stops_are_reachable(self):
        if self.stop_at_target and self.target_val_loss is None:
            raise ConfigError("train.stop_at_target needs train.target_val_loss (the validation loss to reach)")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.steps:
            raise ConfigError(f"train.stop_at_step={self.stop_at_step} must be in [1, train.steps={self.steps}]")
        return self


@config_class("mesh.")
class MeshConfig:
    """Device mesh axes (-1 takes the remaining devices) and multi-host setup.

    data, fsdp and tensor split the devices of one host (one slice on TPU pods with several
    slices), over its fast links; dcn_data and dcn_fsdp split the hosts or slices, over the
    data-centre network. The mesh's data axis is dcn_data x data, its fsdp axis dcn_fsdp x fsdp.
    """

    data: Int = 1
    fsdp: Int = -1
    tensor: Int = 1
    # Across hosts (or slices): data parallel by default, so FSDP's per-micro-batch gathers stay
    # on the fast links. One process, one slice: both are 1.
    dcn_data: Int = -1
    dcn_fsdp: Int = 1
    devices: Int | None = Field(None, ge=1, description="null uses all devices")  # the first N devices only
    # When FSDP gathers the weights (in the compute dtype): for every micro-batch, or once a step
    # before the micro-batches (a whole compute-dtype copy of the model on every device; the
    # gradients are still reduce-scattered per micro-batch).
    gather_weights: Literal["micro_batch", "step"] = "micro_batch"
    # Multi-host start: "auto" starts jax.distributed when a cluster launched this process (Slurm,
    # Open MPI, TPU pod workers, Kubernetes indexed jobs), true always, false never. Unset
    # coordinator fields are found by JAX on those clusters.
    distributed: Literal["auto", True, False] = "auto"
    coordinator_address: str | None = None
    num_processes: Int | None = Field(None, ge=1)
    process_id: Int | None = Field(None, ge=0)
    connect_timeout_s: Int = Field(60, ge=1, description="how long to wait for the coordinator and the other processes")

    @model_validator(mode="after")
    def _axes(self):
        for group in (("data", "fsdp", "tensor"), ("dcn_data", "dcn_fsdp")):
            axes = {name: getattr(self, name) for name in group}
            for name, value in axes.items():
                if value != -1:
                    check_number(f"mesh.{name}", value, integer=True, low=1, hint="or -1 for the remaining devices")
            if list(axes.values()).count(-1) > 1:
                raise ConfigError(f"at most one of {', '.join('mesh.' + n for n in group)} may be -1")
        return self


@config_class("eval.")
class EvalConfig:
    every: Int = Field(100, ge=1)  # steps between validation passes (and one at the end)
    batches: Int = Field(8, ge=1)  # fixed validation batches (the first ones of the val split)
    at_start: Bool = True  # also evaluate the fresh model, so a curve starts at step 0
    batch_size: Int | None = Field(None, ge=1)  # None: data.micro_batch or data.global_batch


@config_class("logging.")
class LoggingConfig:
    every: Int = Field(10, ge=1)  # steps between metrics.jsonl / W&B records
    progress: Bool = True  # tqdm progress bar
    wandb: Literal[WANDB_MODES] = "disabled"
    wandb_project: str = "celo2-gpt"
    wandb_name: str | None = None  # None: the run directory's name
    diagnostics: Bool = False  # per-branch update statistics (recipes.optim.diagnostics)


@config_class("sample.")
class SampleConfig:
    """Text generated from the final model, printed after the run's summary (0 tokens: none)."""

    prompt: str = Field("\n", min_length=1)
    max_new_tokens: Int = Field(0, ge=0, le=MAX_NEW_TOKENS)
    temperature: Float = Field(0.8, ge=0, description="0 is greedy")
    top_k: Int | None = Field(None, ge=1)
    seed: Int = 0


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
    def _fits(self, info: ValidationInfo):
        if self.seq_len > self.model.context_length:
            raise ConfigError(
                f"data.seq_len={self.seq_len} exceeds model.context_length="
                f"{self.model.context_length}; lower data.seq_len or raise the context length")
        schedule = self.optimizer.schedule
        try:
            warmup = schedule.fitting_warmup(self.total_steps, (info.context or {}).get(WARMUP_NOTES))
        except ConfigError as error:
            raise ConfigError(f"optimizer.{error}") from None
        if warmup != schedule.warmup_steps:
            fitted = dataclasses.replace(schedule, warmup_steps=warmup)
            object.__setattr__(self, "optimizer", dataclasses.replace(self.optimizer, schedule=fitted))
        return self


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                notes: list[str] | None = None) -> Config:
    """The typed Config from a YAML file (or defaults when None) and command-line overrides.

    A warmup that does not fit in the run is cut to a tenth of it, with a note appended to ``notes``.
    """
    return Config.from_file(path, overrides or [], context={WARMUP_NOTES: notes if notes is not None else []})
