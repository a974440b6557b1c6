"""Generate text from a run's checkpoint.

    python scripts/sample.py --checkpoint runs/shakespeare_celo2 --prompt $'**ROMEO**\n' \
        --max-new-tokens 100 --temperature 0.8 [--top-k 50] [--seed 0]

--temperature 0 is greedy decoding. Each new token is one forward pass on the cached
keys and values of the text so far, until the text fills the context; after that
each token is predicted from the last context_length tokens. Generation thus has no end of
its own, and each token past the context costs a forward pass over a whole window:
--max-new-tokens is capped at 10,000 (about 7,500 words); for more, sample again with the
end of the text as --prompt. Without --step the newest checkpoint that restores is used, as train.py
resumes: a damaged one is moved aside to checkpoints.damaged/ (said on stderr) and the next
older one is taken. The model is read with the settings its checkpoint was trained with.
"""
from __future__ import annotations

import argparse

from recipes import messages
from recipes.train.cli import run_main
from data.tokenizer import gpt2_encoding
from model.sampling import MAX_NEW_TOKENS, generate
from model.config_base import ConfigError
from recipes.train.config import SampleConfig
from recipes.train.run_params import load_run_params


def main(argv: list[str] | None = None) -> list[int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory (train.out_dir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=100, help=f"0 to {MAX_NEW_TOKENS:,}")
    parser.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0: greedy")
    parser.add_argument("--top-k", type=int, default=None, help=">= 1: sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_arguments(args)
    messages.setup(stream="stderr")  # stdout is the text
    config, params, _ = load_run_params(args.checkpoint, args.step)
    encoding = gpt2_encoding()
    prompt_ids = encoding.encode(args.prompt, allowed_special={"<|endoftext|>"})
    top_k = None if args.top_k is None else min(args.top_k, config.model.vocab_size)  # k >= vocab: every token
    ids = generate(config.model, params, prompt_ids, args.max_new_tokens, args.temperature, top_k, args.seed)
    print(encoding.decode(ids))
    return ids


# What a flag's refusal adds to the sample section's own words.
_FLAG_HINTS = {"prompt": "give at least one character, e.g. --prompt $'\\n'",
               "top_k": "leave it out to sample from every token"}


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses, before any checkpoint is read, what train.py's sample section refuses, naming the flag."""
    values = {name: getattr(args, name) for name in ("prompt", "max_new_tokens", "temperature", "top_k", "seed")}
    try:
        SampleConfig(**values)
    except ConfigError as error:
        message = str(error).replace(" or null, got", ", got")  # a flag's null is leaving it out
        for name in values:
            if f"sample.{name} " in message:
                message = message.replace(f"sample.{name}", "--" + name.replace("_", "-"))
                message += f"; {_FLAG_HINTS[name]}" if name in _FLAG_HINTS else ""
        raise ConfigError(message) from None


if __name__ == "__main__":
    raise SystemExit(run_main(main))
