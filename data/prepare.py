"""Tokenize a corpus with GPT-2's BPE into train/val token shards.

    python -m data.prepare --preset fineweb-edu --out data/fineweb-edu
    python -m data.prepare --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --out DIR
    python -m data.prepare --files a.txt b.jsonl c.parquet --out DIR
    python -m data.prepare --preset shakespeare --out DIR

Every document is prefixed with <|endoftext|>. Output: DIR/train_000000.bin ..., DIR/val_000000.bin
... (modded-nanogpt's headered uint16 layout, see data/shards.py) and DIR/meta.json, written last.

This module is the command line only; the work is done by data/prepare_corpus.py (and, for the
bundled corpus, data/shakespeare.py), which never import it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from data import shakespeare
from data.prepare_corpus import DEFAULT_SHARD_SIZE, default_workers, prepare_files, prepare_hf
from data.presets import DEFAULT_VAL_FRACTION, PRESETS, Preset
from data.sources import DatasetUnavailableError
from data.tokenizer import TokenizerUnavailableError


def _positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:<12} {p.about}" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Tokenize a corpus with GPT-2's BPE into train/val token shards "
        "(modded-nanogpt layout: 256 x int32 header, then uint16 tokens) plus meta.json. "
        "Every document is prefixed with <|endoftext|> (token 50256).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets:\n{presets}\n\nexamples:\n"
        "  python -m data.prepare --preset shakespeare --out data/shakespeare\n"
        "  python -m data.prepare --preset fineweb-edu --out data/fineweb-edu --max-tokens 1_000_000_000\n"
        "  python -m data.prepare --files notes.txt web.jsonl more.parquet --text-field text --out data/mine",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a known corpus (see below)")
    source.add_argument(
        "--dataset", metavar="ID", help="a Hugging Face dataset, streamed, e.g. HuggingFaceFW/fineweb-edu"
    )
    source.add_argument(
        "--files",
        nargs="+",
        metavar="PATH",
        help="local .txt/.md/.json/.jsonl/.parquet/.csv files (also .gz/.bz2/.xz compressed)",
    )
    parser.add_argument("--name", metavar="CONFIG", help="dataset configuration (--dataset), e.g. sample-10BT")
    parser.add_argument("--split", default="train", help="dataset split to read (--dataset; default: train)")
    parser.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    parser.add_argument(
        "--text-unit",
        choices=("document", "paragraph", "line"),
        default="document",
        help="what one document is in .txt/.md files (default: the whole file)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="output directory (required, except for --preset shakespeare: default is the cache the trainer uses)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        help=f"fraction of documents held out for validation (default: {DEFAULT_VAL_FRACTION}, openwebtext "
        "0.0005; shakespeare holds out fixed plays)",
    )
    parser.add_argument(
        "--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE, help="tokens per shard (default: 100_000_000)"
    )
    parser.add_argument(
        "--workers", type=_positive_int, help=f"tokenizer processes (default: CPUs available, here {default_workers()})"
    )
    parser.add_argument("--max-tokens", type=_positive_int, help="stop after about this many tokens (train + val)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards and meta.json already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options: dict[str, Any] = {
        "shard_size": args.shard_size,
        "workers": args.workers,
        "max_tokens": args.max_tokens,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }
    preset = PRESETS[args.preset] if args.preset else None
    if preset is not None and (args.name is not None or args.split != "train"):
        parser.error("--name and --split go with --dataset; a preset fixes them")
    if args.out is None and not (preset is not None and preset.dataset is None):
        parser.error("--out DIR is required")
    try:
        if preset is not None and preset.dataset is None:
            if args.val_fraction is not None:
                parser.error("--val-fraction does not apply to shakespeare: its val split is fixed plays")
            if args.out is None:
                if args.max_tokens is not None or args.shard_size != DEFAULT_SHARD_SIZE:
                    parser.error("the shakespeare cache is always prepared in full; give --out DIR to customize")
                path = shakespeare.ensure_shakespeare(
                    workers=args.workers or default_workers(), progress=not args.no_progress, verbose=True
                )
                print(f"shakespeare is ready in {path}")
                return 0
            result = shakespeare.prepare_shakespeare(args.out, **options)
        elif preset is not None or args.dataset:
            hub = preset or Preset(args.dataset, args.name, args.split, args.text_field)
            text_field = args.text_field if args.text_field != "text" else hub.text_field
            fraction = hub.val_fraction if args.val_fraction is None else args.val_fraction
            assert hub.dataset is not None
            result = prepare_hf(
                hub.dataset, args.out, name=hub.name, split=hub.split, text_field=text_field, val_fraction=fraction,
                **options,
            )
        else:
            fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
            result = prepare_files(
                args.files,
                args.out,
                text_field=args.text_field,
                text_unit=args.text_unit,
                val_fraction=fraction,
                **options,
            )
    except (DatasetUnavailableError, TokenizerUnavailableError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
