"""Text generation from a trained GPT: temperature and top-k sampling, or greedy at temperature 0."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.functional import abstract_params, make_apply


def generate(config, params, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> list[int]:
    """prompt_ids followed by max_new_tokens generated ids."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    graphdef, _ = abstract_params(config)
    apply = make_apply(graphdef)
    width, vocab = config.context_length, config.vocab_size

    @jax.jit
    def next_logits(params, window_1xW, last):
        # Right padding is invisible to earlier positions under causal attention, so one
        # fixed-width program serves every length.
        return apply(params, window_1xW)[0, last, :vocab]

    ids = list(prompt_ids)
    key = jax.random.key(seed)
    for _ in range(max_new_tokens):
        window = ids[-width:]
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(window)] = window
        logits_V = next_logits(params, jnp.asarray(padded), len(window) - 1)
        if temperature == 0:
            token = int(jnp.argmax(logits_V))
        else:
            logits_V = logits_V / temperature
            if top_k is not None:
                kth = jax.lax.top_k(logits_V, top_k)[0][-1]
                logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
            key, sub = jax.random.split(key)
            token = int(jax.random.categorical(sub, logits_V))
        ids.append(token)
    return ids
