"""Throughput, MFU and where metrics go: metrics.jsonl, a tqdm bar and Weights & Biases."""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import jax
import numpy as np

from model.config import ModelConfig
from data.files import atomic_write

# Dense bf16 peak FLOP/s per device, from the vendors' spec sheets (SXM parts for NVIDIA).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v6 lite": 918e12,  # v6e
    "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak FLOP/s of one device, None where unknown (CPUs, unlisted accelerators)."""
    # Longest name first, so "TPU v5 lite" wins over "TPU v5".
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_FLOPS[name]
    return None


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward, embeddings' lookup excluded,
    the tied output projection included) plus attention's 12 * layers * width * seq_len."""
    d, layers = config.d_model, config.n_layer
    matmul_weights = layers * (12 * d * d) + d * config.padded_vocab_size
    return 6 * matmul_weights + 12 * layers * d * seq_len


def mfu(tokens_per_s: float, config: ModelConfig, seq_len: int, devices) -> float | None:
    """Model FLOPs utilization over ``devices`` (the mesh's), None where the peak is unknown."""
    peak = peak_flops(devices[0].device_kind)
    if peak is None:
        return None
    return tokens_per_s * flops_per_token(config, seq_len) / (peak * len(devices))


def json_safe(value):
    """Non-finite floats as null, in nested dicts and lists too: JSON has no NaN, and what the
    project writes must parse anywhere."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):  # numpy scalars as their Python values
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# The fields a resume reads from the rows kept (recipes.train.run_dir.resume_records).
RESUME_FIELDS = ("wall_time_s", "target_step", "target_tokens", "target_wall_time_s")


def _is_record(row) -> bool:
    """Whether a parsed line is a row the trainer wrote: an object whose step and clock are numbers."""
    if not isinstance(row, dict):
        return False
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    step = row.get("step", 0)
    return (number(step) and step == int(step) and step >= 0
            and all(row.get(key) is None or number(row[key]) for key in RESUME_FIELDS))


def _parse_rows(text: str) -> list[dict]:
    """The trainer's rows of a metrics.jsonl; a line cut short by a crash, or one edited into
    something else, is not one (on resume it is set aside, never deleted)."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if _is_record(row):
            rows.append(row)
    return rows


def read_records(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir``/metrics.jsonl (a line cut short by a crash is skipped)."""
    path = run_dir / "metrics.jsonl"
    return _parse_rows(path.read_text()) if path.is_file() else []


def _keep_records_through(run_dir: Path, step: int | None) -> list[dict]:
    """Keeps in metrics.jsonl the rows through ``step`` (none when the run starts afresh) and moves
    the others, written after the checkpoint a killed run resumes from, to metrics.set_aside.jsonl:
    replayed steps are not counted twice, and no row is ever deleted. Returns the rows kept."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    rows = _parse_rows(text)
    kept = [row for row in rows if step is not None and row.get("step", 0) <= step]
    if len(kept) != len(text.splitlines()):
        kept_lines = {json.dumps(row) for row in kept}
        aside = [line for line in text.splitlines() if line.strip() and line not in kept_lines]
        with open(run_dir / "metrics.set_aside.jsonl", "a") as f:  # appended before metrics.jsonl shrinks
            f.write("".join(line + "\n" for line in aside))
            f.flush()
            os.fsync(f.fileno())
        atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept))
    return kept


class MetricsLog:
    """Appends one JSON record per call to metrics.jsonl and mirrors it to W&B (process 0 only)."""

    def __init__(self, run_dir: Path, *, wandb_mode: str, project: str, name: str, config: dict,
                 resume_step: int | None = 0):
        """``resume_step``: the step training restarts from, None for a fresh start; records past it
        (written after the checkpoint a killed run resumes from) are set aside (_keep_records_through).
        The rows kept are ``self.records`` (on process 0; empty on the others)."""
        self.enabled = jax.process_index() == 0
        self.records = _keep_records_through(run_dir, resume_step) if self.enabled else []
        self._file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        self._wandb = None
        if self.enabled and wandb_mode != "disabled":
            import wandb  # imported only when used: it is slow to import

            self._wandb = wandb.init(project=project, name=name, dir=str(run_dir), mode=wandb_mode,
                                     config=config, resume="allow", id=_wandb_id(run_dir))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = json_safe(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items()
                             if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)},
                            step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed run continues its curves."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(initial=start, total=total, disable=not enabled, dynamic_ncols=True, unit="step")
