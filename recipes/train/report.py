"""What a person reads when a run ends: the numbers, where things are, what to run next, a sample."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def python_command() -> str:
    """The interpreter that ran this, as a command that works from the current directory."""
    exe = Path(sys.executable)
    try:
        relative = os.path.relpath(exe)
    except ValueError:  # another drive
        return str(exe)
    return relative if not relative.startswith("..") and os.sep in relative else str(exe)


def summary_lines(summary: dict, first_val_loss: float | None, tokens: int, wall_s: float,
                  checkpoint_dir: Path, prompt: str) -> list[str]:
    run = Path(summary["run_dir"])
    shown = os.path.relpath(run) if not os.path.relpath(run).startswith("..") else str(run)
    state = "finished" if summary.get("finished") else f"stopped at step {summary['step']} of {summary['total_steps']}"

    def loss(value):
        return "n/a" if value is None else f"{value:.3f}"

    val = loss(summary.get("val_loss"))
    if first_val_loss is not None and summary.get("val_loss") is not None:
        val = f"{first_val_loss:.3f} -> {val}"
    python = python_command()
    return [
        "",
        f"run {state}: {summary['step'] - summary['start_step']:,} steps ({tokens:,} tokens) in {wall_s:.0f} s; "
        f"train loss {loss(summary.get('train_loss'))}, validation loss {val}",
        f"checkpoints: {checkpoint_dir}",
        f"sample:  {python} scripts/sample.py --checkpoint {shlex.quote(shown)} --prompt {_shell(prompt)}",
        f"export:  {python} scripts/export_hf.py --checkpoint {shlex.quote(shown)} --out hf_model",
    ]


def _shell(text: str) -> str:
    """A shell word for ``text``, with ANSI-C quoting when it holds a newline."""
    if "\n" not in text and "\t" not in text:
        return shlex.quote(text)
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    return f"$'{escaped}'"


def sample_text(config, params) -> str:
    """``config.sample.max_new_tokens`` tokens the model writes after ``config.sample.prompt``."""
    from data.tokenizer import gpt2_encoding
    from model.sampling import generate

    encoding = gpt2_encoding()
    s = config.sample
    prompt_ids = encoding.encode(s.prompt, allowed_special={"<|endoftext|>"})
    ids = generate(config.model, params, prompt_ids, s.max_new_tokens, s.temperature, s.top_k, s.seed)
    return encoding.decode(ids)
