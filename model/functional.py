"""Pure-function view of the model, for jax.jit / jax.grad and optimizers on nnx.State.

    graphdef, params = init_params(config, seed=0, mesh=mesh)
    loss_fn = make_loss_fn(graphdef)
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxLp1)

`params` is an nnx.State; its tree paths read like ['blocks']['attn']['qkv']['kernel'].
The returned functions also accept nnx.to_pure_dict(params), a plain dict of arrays.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from model.config import ModelConfig
from model.gpt import GPT
from model.sharding import param_shardings


def abstract_params(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and parameter shapes/dtypes, without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=8)
def _jitted_init(config: ModelConfig, mesh: Mesh | None):
    # Cached so that new seeds reuse the compiled initialiser.
    def init(seed: jax.Array) -> nnx.State:
        return nnx.split(GPT(config, rngs=nnx.Rngs(jax.random.key(seed))))[1]

    _, abstract = abstract_params(config)
    shardings = None if mesh is None else param_shardings(abstract, mesh)
    return jax.jit(init, out_shardings=shardings)


def init_params(config: ModelConfig, *, seed: int = 0,
                mesh: Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Initialise parameters; with a mesh they are created already sharded."""
    graphdef, _ = abstract_params(config)
    return graphdef, _jitted_init(config, mesh)(jnp.asarray(seed, jnp.uint32))


def make_apply(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """apply(params, tokens_BxL) -> float32 logits (B, L, padded_vocab_size)."""
    def apply(params: nnx.State, tokens_BxL: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(tokens_BxL)
    return apply


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """loss(params, tokens_BxLp1) -> mean next-token cross-entropy (float32 scalar)."""
    def loss(params: nnx.State, tokens_BxLp1: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).loss(tokens_BxLp1)
    return loss
