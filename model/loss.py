"""Next-token cross-entropy."""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
