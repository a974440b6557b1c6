"""Faults met by real train.py processes: each ends in its documented exit code and, where it fails,
one `error:` line without a traceback, and leaves a run directory that resumes."""
import json
import os
import subprocess
import sys
from pathlib import Path

from test_train import TINY, final_params

ROOT = Path(__file__).resolve().parents[1]


def train_process(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [*TINY, "--train.steps=40", "--train.checkpoint_every=4", "--train.keep_checkpoints=2",
            "--optimizer.schedule.warmup_steps=0", "--eval.at_start=false", f"--train.out_dir={run_dir}", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("CELO2_DEBUG", None)
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stdout
    return lines[0]


def test_divergence_and_a_changed_model_leave_a_trusted_resumable_run(tmp_path):
    run_dir = tmp_path / "run"
    healthy = train_process(run_dir, "--train.stop_at_step=8")
    assert healthy.returncode == 0, healthy.stderr[-3000:]

    diverged = train_process(run_dir, "--optimizer.lr=1e6", "--train.max_nonfinite_steps=2")
    assert diverged.returncode == 3
    assert "the last trusted state" in one_error_line(diverged)
    assert json.loads((run_dir / "summary.json").read_text())["trusted_step"] == 8
    assert final_params(run_dir)[0] == 8

    changed = train_process(run_dir, "--model.d_model=128")
    assert changed.returncode == 1
    assert "another model or optimizer layout (model.d_model 64 -> 128)" in one_error_line(changed)
    assert final_params(run_dir)[0] == 8 and "d_model: 64" in (run_dir / "config.yaml").read_text()
