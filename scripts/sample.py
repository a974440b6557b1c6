"""Generate text from a run's checkpoint.

    python scripts/sample.py --checkpoint runs/shakespeare_celo2 --prompt $'**ROMEO**\n' \
        --max-new-tokens 100 --temperature 0.8 [--top-k 50] [--seed 0]

--temperature 0 is greedy decoding. Each new token is one forward pass on the cached
keys and values of the text so far, until the text fills the context; after that
each token is predicted from the last context_length tokens.
"""
from __future__ import annotations

import argparse

from recipes.train.cli import run_main
from data.tokenizer import gpt2_encoding
from model.sampling import generate
from recipes.train.checkpoint import load_run_params


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
    raise SystemExit(run_main(main))
