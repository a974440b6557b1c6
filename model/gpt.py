"""GPT-2 decoder in Flax NNX with all transformer blocks stacked and run by lax.scan.

Shape suffixes: B batch, L sequence, D d_model, H heads, K head_dim, F mlp width
(4D), V padded vocab. The residual stream is float32 unless model.residual_dtype says
otherwise; matmuls run in the config's compute dtype; parameters are float32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import Dense, LayerNorm, param
from model.loss import PAD_LOGIT, fused_next_token_loss, split_inputs_targets
from model.sharding import constrain, free_axes, logical_to_spec, manual_or_no_mesh

_ACT_BxLxD = ("batch", "seq", "act_embed")
# What a rematerialized layer keeps for its backward pass (model.remat): "dots" keeps the outputs
# of the weight matmuls, written as 2-d matmuls without batch dims; attention's batched
# matmuls and every elementwise op are recomputed. "full" keeps nothing but the layer's input.
REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}
_ACT_BxLxHxK = ("batch", "seq", "act_heads", "act_head_dim")


def attention_impl(config: ModelConfig, dtype, backend: str) -> str:
    """Which attention implementation to use: "xla" runs ``attend``, the others go to
    jax.nn.dot_product_attention."""
    if config.attention_impl != "auto":
        return config.attention_impl
    # jax picks "xla" when asked for none; the fused cuDNN kernel needs a GPU and bf16.
    if backend == "gpu" and jnp.dtype(dtype) == jnp.bfloat16:
        return "cudnn"
    return "xla"


def attend(q_BxTxHxK, k_BxCxHxK, v_BxCxHxK, visible_TxC):
    """Softmax attention of T queries over C keys where visible_TxC allows, float32 scores.

    The arithmetic of jax.nn.dot_product_attention's "xla" path, with the heads
    moved ahead of the positions first: XLA:CPU then runs the batched matmuls
    and the softmax over contiguous rows, about 25% faster forward and backward.
    """
    q_BxHxTxK, k_BxHxCxK, v_BxHxCxK = (jnp.swapaxes(x, 1, 2) for x in (q_BxTxHxK, k_BxCxHxK, v_BxCxHxK))
    scores_BxHxTxC = jnp.einsum("bhtk,bhck->bhtc", q_BxHxTxK, k_BxHxCxK, preferred_element_type=jnp.float32)
    scores_BxHxTxC = jnp.where(visible_TxC, scores_BxHxTxC * (1.0 / math.sqrt(q_BxTxHxK.shape[-1])), -jnp.inf)
    weights_BxHxTxC = jax.nn.softmax(scores_BxHxTxC, axis=-1).astype(v_BxHxCxK.dtype)
    out_BxHxTxK = jnp.einsum("bhtc,bhck->bhtk", weights_BxHxTxC, v_BxHxCxK)
    return jnp.swapaxes(out_BxHxTxK, 1, 2)


def fused_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, impl: str):
    """Causal jax.nn.dot_product_attention. Inside a shard_map that leaves some mesh axes automatic (the
    train step's per-data-shard accumulation) it runs per shard of the others: the cuDNN kernel's own
    partitioning cannot place itself on such a mesh. Rows and heads are independent, so it is exact."""
    attention = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=impl)
    mesh = jax.sharding.get_abstract_mesh()
    if manual_or_no_mesh() or not mesh.manual_axes:
        return attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
    spec = logical_to_spec(_ACT_BxLxHxK, q_BxLxHxK.shape, mesh)
    return jax.shard_map(attention, in_specs=(spec,) * 3, out_specs=spec,
                         axis_names=free_axes(mesh))(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack=(), stack_axes=()):
        self.config = config
        d, std = config.d_model, config.init_std
        kw = dict(bias=config.bias, rngs=rngs, stack=stack, stack_axes=stack_axes)
        # qkv columns are [q | k | v], each head-major: the same layout as HF's c_attn.
        self.qkv = Dense(d, 3 * d, axes=("embed", "heads"), init_std=std, **kw)
        # GPT-2 shrinks the init of projections into the residual stream by
        # 1/sqrt(2 * n_layer) (two per block) so its variance does not grow with depth.
        self.proj = Dense(d, d, axes=("heads", "embed"),
                          init_std=std / math.sqrt(2 * config.n_layer), **kw)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        B, L, D = x_BxLxD.shape
        H, K = self.config.n_head, self.config.head_dim
        qkv_BxLx3D = self.qkv(x_BxLxD)
        q_BxLxD, k_BxLxD, v_BxLxD = jnp.split(qkv_BxLx3D, 3, axis=-1)
        q_BxLxHxK = constrain(q_BxLxD.reshape(B, L, H, K), _ACT_BxLxHxK)
        k_BxLxHxK = constrain(k_BxLxD.reshape(B, L, H, K), _ACT_BxLxHxK)
        v_BxLxHxK = constrain(v_BxLxD.reshape(B, L, H, K), _ACT_BxLxHxK)
        impl = attention_impl(self.config, q_BxLxHxK.dtype, jax.default_backend())
        if impl == "xla":
            causal_LxL = jnp.tril(jnp.ones((L, L), bool))
            out_BxLxHxK = attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal_LxL)
        else:
            out_BxLxHxK = fused_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, impl)
        out_BxLxHxK = constrain(out_BxLxHxK, _ACT_BxLxHxK)
        return self.proj(out_BxLxHxK.reshape(B, L, D))

    def decode(self, x_BxTxD: jax.Array, cache: tuple, pos: jax.Array) -> tuple[jax.Array, tuple]:
        """Attention for T new positions starting at ``pos``, keys and values of earlier ones
        read from ``cache`` = (k_BxCxHxK, v_BxCxHxK), C = context_length; returns (out, new cache)."""
        B, T, D = x_BxTxD.shape
        H, K = self.config.n_head, self.config.head_dim
        q_BxTxD, k_BxTxD, v_BxTxD = jnp.split(self.qkv(x_BxTxD), 3, axis=-1)
        k_BxCxHxK = jax.lax.dynamic_update_slice(cache[0], k_BxTxD.reshape(B, T, H, K).astype(cache[0].dtype),
                                                 (0, pos, 0, 0))
        v_BxCxHxK = jax.lax.dynamic_update_slice(cache[1], v_BxTxD.reshape(B, T, H, K).astype(cache[1].dtype),
                                                 (0, pos, 0, 0))
        C = k_BxCxHxK.shape[1]
        q_BxTxHxK = q_BxTxD.reshape(B, T, H, K)
        visible_TxC = jnp.arange(C)[None, :] <= pos + jnp.arange(T)[:, None]  # causal, and only written slots
        out_BxTxHxK = attend(q_BxTxHxK, k_BxCxHxK.astype(q_BxTxHxK.dtype), v_BxCxHxK.astype(q_BxTxHxK.dtype),
                             visible_TxC)
        return self.proj(out_BxTxHxK.reshape(B, T, D)), (k_BxCxHxK, v_BxCxHxK)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack=(), stack_axes=()):
        d, f, std = config.d_model, config.d_mlp, config.init_std
        kw = dict(bias=config.bias, rngs=rngs, stack=stack, stack_axes=stack_axes)
        self.fc = Dense(d, f, axes=("embed", "mlp"), init_std=std, **kw)
        self.proj = Dense(f, d, axes=("mlp", "embed"),
                          init_std=std / math.sqrt(2 * config.n_layer), **kw)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = jax.nn.gelu(self.fc(x_BxLxD), approximate=True)  # GPT-2's tanh GELU
        h_BxLxF = constrain(h_BxLxF, ("batch", "seq", "act_mlp"))
        return self.proj(h_BxLxF)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block. Built with stack=(n_layer,) it holds every
    layer's weights; __call__ runs one layer (one slice, as handed out by lax.scan)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack=(), stack_axes=()):
        self.config = config
        kw = dict(stack=stack, stack_axes=stack_axes)
        ln = dict(bias=config.bias, eps=config.layer_norm_eps, **kw)
        self.ln_1 = LayerNorm(config.d_model, **ln)
        self.attn = Attention(config, rngs=rngs, **kw)
        self.ln_2 = LayerNorm(config.d_model, **ln)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dtype, residual = jnp.dtype(self.config.compute_dtype), x_BxLxD.dtype
        x_BxLxD = x_BxLxD + self.attn(self.ln_1(x_BxLxD, dtype)).astype(residual)
        x_BxLxD = x_BxLxD + self.mlp(self.ln_2(x_BxLxD, dtype)).astype(residual)
        return constrain(x_BxLxD, _ACT_BxLxD)

    def decode(self, x_BxTxD: jax.Array, cache: tuple, pos: jax.Array) -> tuple[jax.Array, tuple]:
        dtype, residual = jnp.dtype(self.config.compute_dtype), x_BxTxD.dtype
        attended, cache = self.attn.decode(self.ln_1(x_BxTxD, dtype), cache, pos)
        x_BxTxD = x_BxTxD + attended.astype(residual)
        x_BxTxD = x_BxTxD + self.mlp(self.ln_2(x_BxTxD, dtype)).astype(residual)
        return x_BxTxD, cache


def empty_kv_cache(config: ModelConfig, batch: int) -> tuple:
    """The key/value cache GPT.decode fills: (k, v), each (n_layer, batch, context_length, n_head, head_dim)."""
    shape = (config.n_layer, batch, config.context_length, config.n_head, config.head_dim)
    dtype = jnp.dtype(config.compute_dtype)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


class GPT(nnx.Module):
    """GPT-2: learned positions, pre-LN blocks, final LayerNorm, head tied to wte.

    Parameter paths: wte, wpe, blocks/{ln_1,attn/{qkv,proj},ln_2,mlp/{fc,proj}}/...,
    ln_f/{scale,bias}; everything under blocks has a leading n_layer axis.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, std = config.d_model, config.init_std
        init = jax.nn.initializers.normal(std)
        wte = init(rngs.params(), (config.padded_vocab_size, d), jnp.float32)
        # Padding rows are never looked up and their logits are masked: keep them at zero.
        wte = wte.at[config.vocab_size:].set(0.0)
        self.wte = param(wte, ("vocab", "embed"))
        self.wpe = param(init(rngs.params(), (config.context_length, d), jnp.float32),
                         ("position", "embed"))
        self.blocks = Block(config, rngs=rngs, stack=(config.n_layer,), stack_axes=("layers",))
        self.ln_f = LayerNorm(d, bias=config.bias, eps=config.layer_norm_eps)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token ids (B, L) -> float32 logits (B, L, padded_vocab_size), for sampling and export;
        training and evaluation use ``loss``, which never holds them all."""
        return self._logits(self.hidden(tokens_BxL))

    def hidden(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token ids (B, L) -> the final LayerNorm's output (B, L, D) in the compute dtype."""
        cfg = self.config
        B, L = tokens_BxL.shape
        if L > cfg.context_length:
            raise ValueError(f"sequence length {L} exceeds context_length {cfg.context_length}")
        tokens_BxL = constrain(tokens_BxL, ("batch", "seq"))

        # Gather the fsdp shards of the table first (as FSDP does for any weight) so
        # the lookup only has to combine the vocab shards.
        wte_VxD = constrain(self.wte[...], ("vocab", None))
        x_BxLxD = jnp.take(wte_VxD, tokens_BxL, axis=0) + self.wpe[...][:L]
        x_BxLxD = constrain(x_BxLxD.astype(cfg.residual_dtype), _ACT_BxLxD)
        x_BxLxD = self._run_blocks(x_BxLxD)
        return self.ln_f(x_BxLxD, jnp.dtype(cfg.compute_dtype))

    def _logits(self, h_BxLxD: jax.Array) -> jax.Array:
        cfg = self.config
        B, L, D = h_BxLxD.shape
        # One (B*L, D) x (D, V) matmul: XLA:CPU runs the 3-d einsum's backward about 1.6x slower
        # (a transposed copy of the logits' gradient), and the head is most of a small model's step.
        logits_NxV = jnp.einsum("nd,vd->nv", h_BxLxD.reshape(B * L, D), self.wte[...].astype(h_BxLxD.dtype),
                                preferred_element_type=jnp.float32)
        logits_BxLxV = constrain(logits_NxV.reshape(B, L, -1), ("batch", "seq", "act_vocab"))
        is_real_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        # Added, not selected: the gradient then passes through unchanged instead of costing
        # a masking pass over the (B, L, V) logits; padded ids get probability 0, so no gradient.
        return logits_BxLxV + jnp.where(is_real_V, 0.0, PAD_LOGIT)

    def decode(self, tokens_BxT: jax.Array, cache: tuple, pos: jax.Array) -> tuple[jax.Array, tuple]:
        """Logits for T tokens placed at positions pos .. pos+T-1 (which must fit in the context),
        attending to the cached keys and values of positions before pos; returns (logits, new cache)."""
        wpe_TxD = jax.lax.dynamic_slice_in_dim(self.wpe[...], pos, tokens_BxT.shape[1])
        x_BxTxD = (jnp.take(self.wte[...], tokens_BxT, axis=0) + wpe_TxD).astype(self.config.residual_dtype)
        graphdef, stacked = nnx.split(self.blocks)

        def layer_step(x_BxTxD, layer):
            layer_params, k, v = layer
            x_BxTxD, (k, v) = nnx.merge(graphdef, layer_params).decode(x_BxTxD, (k, v), pos)
            return x_BxTxD, (k, v)

        x_BxTxD, cache = jax.lax.scan(layer_step, x_BxTxD, (stacked, *cache))
        return self._logits(self.ln_f(x_BxTxD, jnp.dtype(self.config.compute_dtype))), cache

    def _run_blocks(self, x_BxLxD: jax.Array) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)

        def layer_step(x_BxLxD, layer_params):
            return nnx.merge(graphdef, layer_params)(x_BxLxD), None

        if self.config.remat != "none":
            layer_step = jax.checkpoint(layer_step, prevent_cse=False, policy=REMAT_POLICIES[self.config.remat])
        x_BxLxD, _ = jax.lax.scan(layer_step, x_BxLxD, stacked, unroll=self.config.unroll_layers)
        return x_BxLxD

    def loss(self, tokens_BxLp1: jax.Array) -> jax.Array:
        """Mean next-token cross-entropy (float32) of token windows of shape (B, L+1)."""
        inputs_BxL, targets_BxL = split_inputs_targets(tokens_BxLp1)
        h_BxLxD = self.hidden(inputs_BxL)
        return fused_next_token_loss(h_BxLxD, self.wte[...].astype(h_BxLxD.dtype), targets_BxL,
                                     vocab_size=self.config.vocab_size, chunk_tokens=self.config.loss_chunk_tokens)
