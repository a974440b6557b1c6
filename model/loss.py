"""Next-token cross-entropy: from logits, and fused with the output layer in chunks.

The fused loss never holds a float32 (positions x vocabulary) tensor: the tied head's
logits are made one chunk of positions at a time (compute-dtype inputs, float32
accumulation), and the forward pass of training computes the gradients of hidden states
and head weights in the same sweep, so the backward pass only scales them. On a mesh the
sweep runs per shard (shard_map): positions split over the batch axes, the vocabulary over
the tensor axis (softmax statistics combined across it); the head's gradient is summed over
the batch shards once per call, not once per chunk.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.sharding import free_axes, logical_to_spec, manual_or_no_mesh, spec_axes

# Given to padded vocabulary ids: finite (unlike -inf) so p * log(p) and temperature scaling
# stay free of NaN; exp() of it is exactly 0, so padded ids never win and get no gradient.
PAD_LOGIT = -1e9


def next_token_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Mean cross-entropy over all positions, computed in float32."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.mean(log_z_BxL - target_logit_BxL)


def split_inputs_targets(tokens_BxLp1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, L+1) token windows -> inputs (B, L) and the targets shifted by one (B, L)."""
    if tokens_BxLp1.ndim != 2 or tokens_BxLp1.shape[1] < 2:
        raise ValueError(f"expected tokens of shape (B, L+1) with L >= 1, got {tokens_BxLp1.shape}")
    return tokens_BxLp1[:, :-1], tokens_BxLp1[:, 1:]


def chunk_length(batch: int, seq_len: int, chunk_tokens: int) -> int:
    """Positions of the sequence per chunk: the largest divisor of seq_len whose chunk holds at
    most chunk_tokens positions of the (per-device) batch; at least 1."""
    best = 1
    for length in range(1, seq_len + 1):
        if seq_len % length == 0 and batch * length <= chunk_tokens:
            best = length
    return best


def fused_next_token_loss(h_BxLxD: jax.Array, w_VxD: jax.Array, targets_BxL: jax.Array, *,
                          vocab_size: int, chunk_tokens: int) -> jax.Array:
    """Mean cross-entropy of logits h @ w.T over the first vocab_size ids, float32.

    h and w in the compute dtype (their matmuls accumulate in float32); rows of w past
    vocab_size are padding and never win. chunk_tokens bounds the positions per device whose
    float32 logits exist at once.
    """
    return _fused_loss(vocab_size, chunk_tokens, h_BxLxD, w_VxD, targets_BxL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_loss(vocab_size, chunk_tokens, h_BxLxD, w_VxD, targets_BxL):
    loss, _ = _sharded_sweep(h_BxLxD, w_VxD, targets_BxL, vocab_size, chunk_tokens, with_grads=False)
    return loss


def _fused_loss_fwd(vocab_size, chunk_tokens, h_BxLxD, w_VxD, targets_BxL):
    loss, grads = _sharded_sweep(h_BxLxD, w_VxD, targets_BxL, vocab_size, chunk_tokens, with_grads=True)
    return loss, grads


def _fused_loss_bwd(vocab_size, chunk_tokens, grads, g):
    dh_BxLxD, dw_VxD = grads
    return (g * dh_BxLxD).astype(dh_BxLxD.dtype), (g * dw_VxD).astype(dw_VxD.dtype), None


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def _sharded_sweep(h_BxLxD, w_VxD, targets_BxL, vocab_size, chunk_tokens, *, with_grads):
    positions = targets_BxL.size
    sweep = functools.partial(_sweep, vocab_size=vocab_size, chunk_tokens=chunk_tokens, positions=positions,
                              with_grads=with_grads)
    if manual_or_no_mesh():
        return sweep(h_BxLxD, w_VxD, targets_BxL, batch_axes=(), vocab_axes=())
    mesh = jax.sharding.get_abstract_mesh()
    batch_spec = logical_to_spec(("batch", None), targets_BxL.shape, mesh)
    vocab_spec = logical_to_spec(("vocab", None), w_VxD.shape, mesh)
    batch_axes, vocab_axes = (spec_axes(spec[0]) for spec in (batch_spec, vocab_spec))
    h_spec, w_spec = P(batch_spec[0], None, None), P(vocab_spec[0], None)
    body = functools.partial(sweep, batch_axes=batch_axes, vocab_axes=vocab_axes)
    out_specs = (P(), (h_spec, w_spec) if with_grads else None)
    return jax.shard_map(body, in_specs=(h_spec, w_spec, P(batch_spec[0], None)), out_specs=out_specs,
                         axis_names=free_axes(mesh))(h_BxLxD, w_VxD, targets_BxL)


def _sweep(h_BxLxD, w_VxD, targets_BxL, *, vocab_size, chunk_tokens, positions, with_grads, batch_axes,
           vocab_axes):
    """One device's share: loss summed over its positions (then over all), and with_grads the
    gradients of the mean loss for its h and its rows of w."""
    B, L, D = h_BxLxD.shape
    V = w_VxD.shape[0]
    C = chunk_length(B, L, chunk_tokens)
    first_id = jax.lax.axis_index(vocab_axes) * V if vocab_axes else 0
    ids_V = first_id + jnp.arange(V)
    is_real_V = ids_V < vocab_size

    def over_vocab(reduce, x):
        return reduce(x, vocab_axes) if vocab_axes else x

    def chunk(h_NxD, t_N):
        """(loss summed over the chunk's positions, and with_grads its dh and dw)."""
        logits_NxV = jnp.einsum("nd,vd->nv", h_NxD, w_VxD, preferred_element_type=jnp.float32)
        logits_NxV = jnp.where(is_real_V, logits_NxV, PAD_LOGIT)
        max_N = over_vocab(jax.lax.pmax, jnp.max(logits_NxV, axis=-1))
        exp_NxV = jnp.exp(logits_NxV - max_N[:, None])
        sum_N = over_vocab(jax.lax.psum, jnp.sum(exp_NxV, axis=-1))
        local_t_N = t_N - first_id  # the target's column in this shard's rows of w, if it is here
        here_N = (local_t_N >= 0) & (local_t_N < V)
        picked_N = jnp.take_along_axis(logits_NxV, jnp.clip(local_t_N, 0, V - 1)[:, None], axis=-1)[:, 0]
        target_N = over_vocab(jax.lax.psum, jnp.where(here_N, picked_N, 0.0))
        loss_sum = jnp.sum(max_N + jnp.log(sum_N) - target_N)
        if not with_grads:
            return loss_sum, None, None
        scale_N = (1.0 / positions) / sum_N
        dlogits_NxV = (exp_NxV * scale_N[:, None]
                       - jnp.where(ids_V == t_N[:, None], 1.0 / positions, 0.0)).astype(h_NxD.dtype)
        dh_NxD = over_vocab(jax.lax.psum, jnp.einsum("nv,vd->nd", dlogits_NxV, w_VxD,
                                                    preferred_element_type=jnp.float32))
        dw_VxD = jnp.einsum("nv,nd->vd", dlogits_NxV, h_NxD, preferred_element_type=jnp.float32)
        return loss_sum, dh_NxD.astype(h_NxD.dtype), dw_VxD

    if C == L:  # one chunk: no loop around it
        loss_sum, dh_NxD, dw_VxD = chunk(h_BxLxD.reshape(B * L, D), targets_BxL.reshape(B * L))
        dh_BxLxD = None if dh_NxD is None else dh_NxD.reshape(B, L, D)
    else:
        def step(carry, start):
            loss_sum, dh_BxLxD, dw_VxD = carry
            h_NxD = jax.lax.dynamic_slice_in_dim(h_BxLxD, start, C, axis=1).reshape(B * C, D)
            t_N = jax.lax.dynamic_slice_in_dim(targets_BxL, start, C, axis=1).reshape(B * C)
            part, dh_NxD, part_dw_VxD = chunk(h_NxD, t_N)
            if with_grads:
                dh_BxLxD = jax.lax.dynamic_update_slice_in_dim(dh_BxLxD, dh_NxD.reshape(B, C, D), start, axis=1)
                dw_VxD = dw_VxD + part_dw_VxD
            return (loss_sum + part, dh_BxLxD, dw_VxD), None

        # Initial carries made from the inputs, so that inside shard_map they vary over the same mesh
        # axes as what the chunks add to them.
        loss_sum = jnp.zeros_like(h_BxLxD[0, 0, 0], jnp.float32)
        grads = (jnp.zeros_like(h_BxLxD), jnp.zeros_like(w_VxD, jnp.float32) + loss_sum) if with_grads else (None,) * 2
        (loss_sum, dh_BxLxD, dw_VxD), _ = jax.lax.scan(step, (loss_sum, *grads), jnp.arange(0, L, C))
    if batch_axes:
        loss_sum = jax.lax.psum(loss_sum, batch_axes)
    loss = loss_sum / positions
    if not with_grads:
        return loss, None
    # Reduced over the batch shards once, in the weights' dtype like every other weight gradient.
    dw_VxD = dw_VxD.astype(w_VxD.dtype)
    if batch_axes:
        dw_VxD = jax.lax.psum(dw_VxD, batch_axes)
    return loss, (dh_BxLxD, dw_VxD)
