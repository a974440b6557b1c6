"""One build path: a run config -> mesh, abstract state, optimizer, shardings and jitted steps.

train.py, its dry run, the benchmarks, the device check and the ahead-of-time compile
check all build here, so what they measure or compile is what trains. Nothing is
allocated: parameters exist only as shapes until ``init_state`` or a restore.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from model import make_loss_fn
from model.config import ModelConfig
from model.gpt import attention_impl
from recipes.optim.optimizers import build_optimizer, learning_rate_reader, learning_rate_schedules, param_labels
from recipes.optim.routing import RoutingTable
from recipes.optim.theta import normalized_momentum_theta
from recipes.train import mesh as mesh_lib
from recipes.train.config import Config
from recipes.train.shardings import param_sharding_dict, state_shardings
from recipes.train.state import abstract_param_dict, abstract_state, init_state
from recipes.train.step import make_eval_step, make_train_step


def placeholder_theta(config: Config):
    """A Celo2 theta of the right shapes where only shapes matter (dry runs, compile checks), so
    no weights need to be on disk; None for optimizers without one."""
    return normalized_momentum_theta() if config.optimizer.name.startswith("celo2") else None


def for_platform(model: ModelConfig, platform: str) -> ModelConfig:
    """The model config with attention chosen for the devices the program targets, not for this
    host's backend (a compile check on a CPU for a GPU must pick the GPU's kernel)."""
    if model.attention_impl != "auto":
        return model
    dtype = jnp.bfloat16 if model.compute_dtype == "bfloat16" else jnp.float32
    return dataclasses.replace(model, attention_impl=attention_impl(model, dtype, platform))


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything a run needs besides data and a run directory, built from shapes."""

    config: Config
    mesh: Mesh
    graphdef: object
    params_abstract: dict   # parameters as jax.ShapeDtypeStruct
    tx: object              # the optax transformation
    routing: RoutingTable
    shardings: dict         # {params, opt_state, step} -> NamedSharding trees
    state_abstract: dict    # the train state as ShapeDtypeStructs with shardings
    loss_fn: object
    batch_sharding: object
    train_step: object      # jit(state, tokens_GxLp1) -> (state, metrics), state donated
    eval_step: object       # jit(params, tokens_BxLp1) -> mean loss

    @property
    def micro_batches(self) -> int:
        return self.config.data.micro_batches_per_step

    @property
    def micro_batch(self) -> int:
        return self.config.data.global_batch // self.micro_batches

    def tokens_abstract(self) -> jax.ShapeDtypeStruct:
        """One global batch of token windows as a sharded shape."""
        return jax.ShapeDtypeStruct((self.config.data.global_batch, self.config.seq_len + 1), np.int32,
                                    sharding=self.batch_sharding)

    def init_state(self) -> dict:
        """Fresh parameters and optimizer state, created already sharded."""
        return init_state(self.config.model, self.tx, self.config.train.seed, self.mesh, self.shardings)

    def lower(self):
        """The train step lowered for the abstract state and batch (no device memory used)."""
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(self.state_abstract, self.tokens_abstract())

    def compile(self):
        """The train step compiled ahead of time; callable as compiled(state, tokens)."""
        with jax.set_mesh(self.mesh):
            return self.lower().compile()


def build_program(config: Config, *, devices=None, mesh: Mesh | None = None, theta=None,
                  shapes_only: bool = False, diagnostics: bool | None = None) -> TrainProgram:
    """The run's program on ``mesh`` (default: the config's mesh over ``devices`` or all devices).

    theta: Celo2's weights; None loads ``optimizer.theta``. ``shapes_only`` uses a placeholder of
    the right shapes instead, for dry runs and compile checks. ``diagnostics`` (default
    ``logging.diagnostics``) adds per-branch update statistics to the step's metrics.
    """
    if mesh is None:
        mesh = mesh_lib.build_mesh(config.mesh, devices=devices)
    mesh_lib.check_batch(config.data.global_batch, config.data.global_batch // config.data.micro_batches_per_step,
                         mesh)
    if shapes_only and theta is None:
        theta = placeholder_theta(config)
    graphdef, params_abstract = abstract_param_dict(for_platform(config.model, mesh.devices.flat[0].platform))
    # The schedules are built once: the optimizer applies them and the step logs the main one.
    schedules = learning_rate_schedules(config.optimizer, config.train.steps)
    tx, routing = build_optimizer(config.optimizer, params_abstract, theta=theta, schedules=schedules)
    param_sh = param_sharding_dict(config.model, mesh)
    shardings = state_shardings(tx, params_abstract, param_sh, mesh)
    loss_fn = make_loss_fn(graphdef)
    batch_sh = mesh_lib.batch_sharding(mesh)
    diagnostics = config.logging.diagnostics if diagnostics is None else diagnostics
    labels = param_labels(config.optimizer, params_abstract) if diagnostics else None
    train_step = make_train_step(loss_fn, tx, micro_batches=config.data.micro_batches_per_step,
                                 shardings=shardings, batch_sharding=batch_sh, labels=labels,
                                 learning_rate=learning_rate_reader(schedules[config.optimizer.name]),
                                 compute_dtype=jnp.dtype(config.model.compute_dtype),
                                 gather_once=config.mesh.gather_weights == "step")
    return TrainProgram(config=config, mesh=mesh, graphdef=graphdef, params_abstract=params_abstract, tx=tx,
                        routing=routing, shardings=shardings,
                        state_abstract=abstract_state(tx, params_abstract, shardings), loss_fn=loss_fn,
                        batch_sharding=batch_sh, train_step=train_step,
                        eval_step=make_eval_step(loss_fn, param_sh, batch_sh))
