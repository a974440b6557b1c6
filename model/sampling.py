"""Text generation from a trained GPT: temperature and top-k sampling, or greedy at temperature 0."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.functional import abstract_params, make_apply
from model.gpt import empty_kv_cache

# Past the context every new token is a forward pass over a whole window: a request with no end
# would run for hours with nothing shown.
MAX_NEW_TOKENS = 10_000


def _pick(logits_V, temperature: float, top_k: int | None, key):
    if temperature == 0:
        return int(jnp.argmax(logits_V)), key
    logits_V = logits_V / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits_V, top_k)[0][-1]
        logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
    key, sub = jax.random.split(key)
    return int(jax.random.categorical(sub, logits_V)), key


def generate(config, params, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> list[int]:
    """prompt_ids followed by max_new_tokens generated ids (temperature 0: greedy).

    While the text fits in the context, the prompt is run once and every new token costs one
    forward pass of that token on the cached keys and values. Past the context, each token is
    predicted from the last context_length tokens, recomputed.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    graphdef, _ = abstract_params(config)
    width, vocab = config.context_length, config.vocab_size

    @jax.jit
    def decode(params, tokens_1xT, cache, pos):
        logits, cache = nnx.merge(graphdef, params).decode(tokens_1xT, cache, pos)
        return logits[0, -1, :vocab], cache

    apply = make_apply(graphdef)

    @jax.jit
    def window_logits(params, window_1xW, last):
        # Right padding is invisible to earlier positions under causal attention, so one
        # fixed-width program serves every length.
        return apply(params, window_1xW)[0, last, :vocab]

    ids = list(prompt_ids)
    key = jax.random.key(seed)
    cache = None
    if len(ids) <= width:
        cache = empty_kv_cache(config, 1)
        logits_V, cache = decode(params, jnp.asarray([ids], jnp.int32), cache, 0)
    for _ in range(max_new_tokens):
        if cache is None:
            window = ids[-width:]
            padded = np.zeros((1, width), np.int32)
            padded[0, : len(window)] = window
            logits_V = window_logits(params, jnp.asarray(padded), len(window) - 1)
        token, key = _pick(logits_V, temperature, top_k, key)
        ids.append(token)
        if cache is not None:
            if len(ids) > width:
                cache = None  # the context is full: from here on, recompute over the last window
            else:
                logits_V, cache = decode(params, jnp.asarray([[token]], jnp.int32), cache, len(ids) - 1)
    return ids
