"""Export a run's checkpoint as a Hugging Face GPT2LMHeadModel directory.

    python scripts/export_hf.py --checkpoint runs/shakespeare_celo2 --out hf_model [--push-to-hub USER/REPO]
    # then, offline: pipeline("text-generation", model="hf_model")   (pip install -e '.[hf]')

Writes model.safetensors, config.json, generation_config.json and GPT-2's
tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json). --push-to-hub uploads the directory with
huggingface_hub (needs network and a token: `hf auth login`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from recipes.train.cli import run_main
from model import export_hf
from recipes.train.checkpoint import load_run_params


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory (train.out_dir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to this Hub repository")
    args = parser.parse_args(argv)
    config, params, step = load_run_params(args.checkpoint, args.step)
    out = export_hf(params, config.model, args.out)
    print(f"exported step {step} of {args.checkpoint} to {out}")
    if args.push_to_hub:
        push(out, args.push_to_hub, f"{Path(args.checkpoint).name}, step {step}")
    return out


def push(folder: Path, repo: str, description: str) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=f"Upload {description}")
    except Exception as error:  # network, auth and offline mode all end here, with the export kept
        raise SystemExit(f"error: could not push {folder} to the Hub repository {repo}: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__} "
                         f"(the export in {folder} is complete; retry with network and `hf auth login`)") from None
    print(f"pushed {folder} to https://huggingface.co/{repo}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
