"""Generate text from a run's checkpoint.

    python scripts/sample.py --checkpoint runs/shakespeare_celo2 --prompt "ROMEO:" \
        --max-new-tokens 100 --temperature 0.8 [--top-k 50] [--seed 0]

--temperature 0 is greedy decoding. Each token reruns the model on the last
context_length tokens (no KV cache): simple, and fast enough for small models.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.tokenizer import gpt2_encoding  # noqa: E402
from model import make_apply  # noqa: E402
from recipes.checkpoint import load_run_params  # noqa: E402
from recipes.train_step import abstract_model  # noqa: E402


def generate(config, params, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> list[int]:
    """prompt_ids followed by max_new_tokens generated ids."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    graphdef, _ = abstract_model(config)
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


def main(argv: list[str] | None = None) -> list[int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory (train.out_dir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config, params, _ = load_run_params(args.checkpoint, args.step)
    encoding = gpt2_encoding()
    prompt_ids = encoding.encode(args.prompt, allowed_special={"<|endoftext|>"})
    ids = generate(config.model, params, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(encoding.decode(ids))
    return ids


if __name__ == "__main__":
    main()
