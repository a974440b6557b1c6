"""Export a run's checkpoint as a Hugging Face GPT2LMHeadModel directory.

    python scripts/export_hf.py --checkpoint runs/shakespeare_celo2 --out exported/
    # then: transformers.GPT2LMHeadModel.from_pretrained("exported/")
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import export_hf  # noqa: E402
from recipes.checkpoint import load_run_params  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory (train.out_dir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="directory to write model.safetensors and config.json")
    args = parser.parse_args(argv)
    config, params, step = load_run_params(args.checkpoint, args.step)
    out = export_hf(params, config.model, args.out)
    print(f"exported step {step} of {args.checkpoint} to {out}")
    return out


if __name__ == "__main__":
    main()
