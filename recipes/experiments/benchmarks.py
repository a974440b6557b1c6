"""Measurements shared by the benchmark scripts and the device check.

Training: the time of one step split into host data, forward+backward and the
optimizer, and the fused step train.py runs. Optimizer updates: AdamW, Muon,
Celo2-base and Celo2 on given matrix shapes, timed round-robin so machine
noise hits them alike.
"""
from __future__ import annotations

import statistics
import time

import jax
import numpy as np
import optax

from model import make_mesh
from recipes.optim.celo2 import scale_by_celo2
from recipes.train import mesh as mesh_lib
from recipes.train.build import build_program
from recipes.train.config import Config
from recipes.train.metrics import mfu
from recipes.train.step import accumulated_grads

GPT2_SMALL_BLOCK = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
GPT3_XL_BLOCK = [(2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)]


def median_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    """The median of ``repeats`` timed calls of ``fn``, each waited for, after one untimed call (the
    compile and warm-up): the median, unlike the mean, ignores a call a busy machine slowed."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = clock()
        jax.block_until_ready(fn())
        times.append(clock() - start)
    return statistics.median(times)


def compiled_memory(compiled) -> dict:
    """XLA's memory analysis of a compiled program, in bytes per device: ``argument``, ``output``,
    ``alias`` (outputs written into donated arguments, counted in both), ``temp`` and ``code`` (the
    generated code); ``buffers``, what the device's allocator holds at once (arguments and outputs
    less their aliases, and temporaries: what a measured peak_bytes_in_use compares with), and
    ``peak``, that and the code (what a chip must hold). {} where the backend gives no analysis."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    b = {"argument": int(analysis.argument_size_in_bytes), "output": int(analysis.output_size_in_bytes),
         "alias": int(analysis.alias_size_in_bytes), "temp": int(analysis.temp_size_in_bytes),
         "code": int(analysis.generated_code_size_in_bytes)}
    buffers = b["argument"] + b["output"] - b["alias"] + b["temp"]
    return {**b, "buffers": buffers, "peak": buffers + b["code"]}


class TrainingSetup:
    """A recipe's program (recipes.train.build, what train.py runs) with synthetic or real batches."""

    def __init__(self, config: Config, theta=None, mesh=None, synthetic: bool = True):
        self.program = build_program(config, mesh=mesh, theta=theta, diagnostics=False)
        self.config, self.mesh = config, self.program.mesh
        self.micro_batches, self.seq_len = self.program.micro_batches, config.seq_len
        self.params_abstract, self.tx, self.shardings = (self.program.params_abstract, self.program.tx,
                                                         self.program.shardings)
        self.loss_fn, self.batch_sharding = self.program.loss_fn, self.program.batch_sharding
        self.train_step = self.program.train_step
        local_rows = config.data.global_batch // jax.process_count()
        if synthetic:
            rng = np.random.default_rng(0)
            self.host_batch = lambda step: rng.integers(0, config.model.vocab_size, (local_rows, self.seq_len + 1),
                                                        dtype=np.int32)
        else:
            from recipes.train.trainer import TrainData

            # As train.py reads; its notes on the val split are dropped (no eval here).
            loader = TrainData.open(config, self.program, notes=[]).loader
            self.host_batch = loader.train_batch

    def batch(self, step: int = 0) -> jax.Array:
        return mesh_lib.global_batch_array(self.host_batch(step), self.mesh)

    def init(self) -> dict:
        return self.program.init_state()

    def compiled_step(self):
        """The train step compiled ahead of time (once), callable as train_step(state, tokens)."""
        if getattr(self, "_compiled", None) is None:
            self._compiled = self.program.compile()
        return self._compiled

    def compiled_bytes(self) -> dict:
        """XLA's memory analysis of the train step, per device (compiled_memory)."""
        return compiled_memory(self.compiled_step())


def time_training(setup: TrainingSetup, repeats: int, fwd_bwd_seconds: float | None = None) -> dict:
    """Medians of host data, forward+backward, optimizer and the fused step; tokens/s and MFU.

    ``fwd_bwd_seconds``: forward+backward measured already (it does not depend on the optimizer)."""
    config, mesh = setup.config, setup.mesh
    state = setup.init()
    tokens = setup.batch(0)
    counter = iter(range(1, 10**9))
    tx = setup.tx
    with jax.set_mesh(mesh):
        grads_fn = jax.jit(accumulated_grads(setup.loss_fn, setup.micro_batches),
                           in_shardings=(setup.shardings["params"], setup.batch_sharding))
        # Gradient-shaped inputs for the optimizer alone; computing real ones costs a compilation.
        grads = jax.tree.map(lambda p: 1e-3 * jax.numpy.ones_like(p), state["params"]) if fwd_bwd_seconds \
            else grads_fn(state["params"], tokens)[1]

        @jax.jit
        def optimizer_step(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        seconds = {
            "data": median_seconds(lambda: setup.batch(next(counter)), repeats),
            "fwd_bwd": fwd_bwd_seconds or median_seconds(lambda: grads_fn(state["params"], tokens), repeats),
            "optimizer": median_seconds(lambda: optimizer_step(state["params"], state["opt_state"], grads), repeats),
        }
        holder = {"state": state}

        def full_step():
            holder["state"], metrics = setup.train_step(holder["state"], tokens)
            return metrics

        seconds["step"] = median_seconds(full_step, repeats)
    tokens_per_s = config.tokens_per_step / seconds["step"]
    return {
        "optimizer": config.optimizer.name, "devices": mesh.size, "device_kind": jax.devices()[0].device_kind,
        "mesh": mesh_lib.describe(mesh), "tokens_per_step": config.tokens_per_step,
        "micro_batches_per_step": setup.micro_batches, "seconds": {k: round(v, 6) for k, v in seconds.items()},
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": mfu(tokens_per_s, config.model, setup.seq_len, list(mesh.devices.flat)),
    }


def training_losses(config: Config, steps: int, device, theta=None) -> list[float]:
    """Train losses of the first ``steps`` steps of a recipe on its data, on one given device."""
    setup = TrainingSetup(config, theta=theta, mesh=make_mesh(1, 1, 1, devices=[device]), synthetic=False)
    state, losses = setup.init(), []
    with jax.set_mesh(setup.mesh):
        for step in range(steps):
            state, metrics = setup.train_step(state, setup.batch(step))
            losses.append(float(metrics["loss"]))
    return losses


# --- one optimizer update on hidden matrices --------------------------------------------------------

def update_optimizers(theta, rank: int) -> dict[str, optax.GradientTransformation]:
    # Muon must be told that a leading layer axis is a batch axis, or it sends 3-D tensors to Adam.
    matrix_axes = optax.contrib.MuonDimensionNumbers(reduction_axis=rank - 2, output_axis=rank - 1)
    return {
        "adamw": optax.adamw(1e-3),
        "muon": optax.contrib.muon(
            1e-3, muon_weight_dimension_numbers=lambda params: jax.tree.map(lambda _: matrix_axes, params)),
        "celo2_base": optax.chain(scale_by_celo2(theta, orthogonalize=False), optax.scale_by_learning_rate(1e-3)),
        "celo2": optax.chain(scale_by_celo2(theta, orthogonalize=True), optax.scale_by_learning_rate(1e-3)),
    }


def _compiled_update(tx, shapes, grads, key) -> dict:
    """One training-style update (params and state donated, updates applied), compiled."""
    params = [0.02 * jax.random.normal(k, s) for k, s in zip(jax.random.split(key, len(shapes)), shapes)]

    def apply(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    # Lowered from shapes: a second optimizer state would only cost device memory.
    compiled = jax.jit(apply, donate_argnums=(0, 1)).lower(params, jax.eval_shape(tx.init, params), grads).compile()
    memory = compiled_memory(compiled)
    largest = max(int(np.prod(s)) for s in shapes)
    holder = {"carry": (params, tx.init(params))}

    def run_once() -> float:
        start = time.perf_counter()
        holder["carry"] = compiled(*holder["carry"], grads)
        jax.block_until_ready(holder["carry"])
        return time.perf_counter() - start

    for _ in range(2):  # warm-up
        run_once()
    return {"run_once": run_once, "params": sum(int(np.prod(s)) for s in shapes),
            "temp_bytes_per_param_of_largest": (memory["temp"] / largest) if memory else None}


def time_updates(shapes, repeats: int, theta) -> dict[str, dict]:
    """ms per update of each optimizer on ``shapes``, with the Celo2-base/AdamW and Celo2/Muon ratios."""
    grads = [jax.random.normal(k, s) for k, s in zip(jax.random.split(jax.random.key(1), len(shapes)), shapes)]
    runs = {name: _compiled_update(tx, shapes, grads, jax.random.key(0))  # one gradient set shared by all
            for name, tx in update_optimizers(theta, len(shapes[0])).items()}
    times = {name: [] for name in runs}
    for _ in range(repeats):  # round-robin so slow moments of the machine are shared
        for name, run in runs.items():
            times[name].append(run["run_once"]())
    results = {}
    for name, run in runs.items():
        seconds = statistics.median(times[name])
        results[name] = {"ms": 1e3 * seconds, "ns_per_param": 1e9 * seconds / run["params"],
                         "temp_bytes_per_param_of_largest": run["temp_bytes_per_param_of_largest"]}
    ratios = {"celo2_base/adamw": results["celo2_base"]["ms"] / results["adamw"]["ms"],
              "celo2/muon": results["celo2"]["ms"] / results["muon"]["ms"]}
    return {"results": results, "ratios": ratios}
