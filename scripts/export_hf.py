"""Export a run's checkpoint as a Hugging Face GPT2LMHeadModel directory.

    python scripts/export_hf.py --checkpoint runs/shakespeare_celo2 --out hf_model [--push-to-hub USER/REPO]
    # then, offline: pipeline("text-generation", model="hf_model")   (pip install -e '.[hf]')

Writes model.safetensors, config.json, generation_config.json and GPT-2's
tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), each under a temporary name renamed into place, and
.celo2_export.json, which names the run and step exported. --out must be new,
empty, or an earlier export of the same run; --overwrite writes into any
directory (replacing only the files above). Without --step the newest
checkpoint that restores is exported, as train.py resumes: a damaged one is
moved aside to checkpoints.damaged/ and the next older one is taken. The model's
settings are those recorded in the checkpoint exported.
--push-to-hub uploads the directory with huggingface_hub (needs network and a
token: `hf auth login`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipes import messages
from recipes.train.cli import run_main
from model import export_hf
from model.config_base import ConfigError
from data.files import write_json
from recipes.train.run_params import load_run_params

MARKER = ".celo2_export.json"  # {"run_dir": the run's absolute path, "step": the step exported}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory (train.out_dir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest that restores)")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a directory that holds other files, replacing those the export writes")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to this Hub repository")
    args = parser.parse_args(argv)
    run_dir, out = Path(args.checkpoint).resolve(), Path(args.out)
    check_out(out, run_dir, args.overwrite)  # before the checkpoint is read: a refusal costs nothing
    messages.setup()
    config, params, step = load_run_params(args.checkpoint, args.step)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"run_dir": str(run_dir), "step": step})  # first: a cut-short export stays ours
    export_hf(params, config.model, out)
    print(f"exported step {step} of {args.checkpoint} to {out}")
    if args.push_to_hub:
        push(out, args.push_to_hub, f"{Path(args.checkpoint).name}, step {step}")
    return out


def check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuses an --out that is a file, or a non-empty directory that is no earlier export of this run
    (unless ``overwrite``): the export would replace or sit among files it did not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory: pass a new or empty directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out} cannot be created: {parent} is a file, not a directory")
            break
    if run_dir == out.resolve() or run_dir in out.resolve().parents:
        raise ConfigError(f"--out {out} is inside the run directory {run_dir}, which holds only what its "
                          "trainer writes: pick a directory outside it")
    if overwrite or not out.is_dir():
        return
    entries = sorted(entry.name for entry in out.iterdir())
    exported = _exported_run(out)
    if not entries or exported == str(run_dir):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    what = f"an export of another run, {exported}" if exported else f"files no export of {run_dir} wrote ({shown})"
    raise ConfigError(f"--out {out} holds {what}; nothing was changed in it. Pick a new or empty directory, "
                      "or pass --overwrite to replace the exported files in it")


def _exported_run(out: Path) -> str | None:
    """The run directory an earlier export into ``out`` came from, if its marker says."""
    try:
        return json.loads((out / MARKER).read_text()).get("run_dir")
    except (OSError, ValueError, AttributeError):
        return None


def push(folder: Path, repo: str, description: str) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        # The marker names a local path: it stays here.
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=f"Upload {description}",
                          ignore_patterns=[MARKER])
    except Exception as error:  # network, auth and offline mode all end here, with the export kept
        raise SystemExit(f"error: could not push {folder} to the Hub repository {repo}: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__} "
                         f"(the export in {folder} is complete; retry with network and `hf auth login`)") from None
    print(f"pushed {folder} to https://huggingface.co/{repo}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
