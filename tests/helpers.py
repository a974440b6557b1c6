"""Settings and helpers shared by the test folders: the tiny training run, reading what a run wrote,
and starting the project's scripts in real processes. It holds no tests itself."""
import contextlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Tiny model, 8 x 32 tokens per step (the 50K-token output layer is most of a step); AdamW compiles
# fastest. One device unless a test asks; no closing sample unless a test asks (its compile is a
# fifth of a tiny run).
TINY = ["--model.size=tiny", "--data.seq_len=32", "--data.global_batch=8", "--optimizer.name=adamw",
        "--optimizer.lr=3e-3", "--optimizer.schedule.warmup_steps=2", "--eval.batches=2",
        "--eval.every=100", "--logging.progress=false", "--logging.every=1", "--mesh.devices=1",
        "--sample.max_new_tokens=0"]

# Sharded runs sum in a different order (per-shard partial sums, then an all-reduce), so their loss
# curves agree with one device's to float32 rounding, not bitwise (observed: about 3e-7 relative).
SHARDED_RTOL = 2e-5


def records(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    """The training loss of every logged step of a run."""
    return [r["loss"] for r in records(run_dir) if "loss" in r]


def final_params(run_dir: Path):
    """(step, parameters) of the run's latest checkpoint, restored as numpy."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(run_dir / "checkpoints", item_names=("state", "meta")) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, jax.tree.map(np.asarray, restored["state"]["params"])


@contextlib.contextmanager
def logged_lines(name: str = "recipes"):
    """The messages logged under ``name`` while the block runs, one item each: what an entry point
    prints (recipes.messages), whether or not one set printing up in this process."""
    lines = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger(name), Lines(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def process_env() -> dict:
    """CPU only, no debug tracebacks, and the run's one compilation cache (set by conftest.py), so a
    process loads what an earlier test compiled."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("CELO2_DEBUG", None)
    return env


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a failed process printed to stderr (and no traceback anywhere)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stdout
    return lines[0]


def train_process(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """train.py on the tiny model in a real process: 40 steps, checkpoints every 4 (2 kept), no warmup."""
    args = [*TINY, "--train.steps=40", "--train.checkpoint_every=4", "--train.keep_checkpoints=2",
            "--optimizer.schedule.warmup_steps=0", "--eval.at_start=false", f"--train.out_dir={run_dir}", *extra]
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=process_env())


def script(name: str):
    """The module scripts/NAME.py, to call its main() in this process."""
    return importlib.import_module(f"scripts.{name}")


def run_script(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """scripts/NAME.py in a real process, as a user runs it."""
    return subprocess.run([sys.executable, f"scripts/{name}.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=process_env())


def run_at_once(commands: dict, tmp_path: Path) -> dict:
    """key -> CompletedProcess of each command line (a list of words after the interpreter), run side by
    side in real processes."""
    env = process_env()
    started = {key: subprocess.Popen([sys.executable, *words], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for key, words in commands.items()}
    results = {}
    for key, process in started.items():
        out, err = process.communicate(timeout=300)
        results[key] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return results


def damaged_copy(run_dir: Path, tmp_path: Path) -> tuple[Path, int, int]:
    """A copy of ``run_dir`` whose newest checkpoint has its arrays cut short: (copy, newest, older step)."""
    copy = tmp_path / "damaged_run"
    shutil.copytree(run_dir, copy)
    steps = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    for f in (copy / "checkpoints" / str(steps[-1]) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    return copy, steps[-1], steps[-2]


def recipe_setting(recipe: str, *keys: str):
    """A setting as the recipe's YAML writes it (configs/RECIPE.yaml, then the recipes it names with
    ``base:``), read with plain yaml: what the config loader must resolve to. KeyError if none sets it."""
    import yaml

    path = ROOT / "configs" / (recipe if recipe.endswith(".yaml") else f"{recipe}.yaml")
    while True:
        value = yaml.safe_load(path.read_text())
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            return value
        base = yaml.safe_load(path.read_text()).get("base")
        if base is None:
            raise KeyError(f"{path.name} and its bases set no {'.'.join(keys)}")
        path = path.parent / base
