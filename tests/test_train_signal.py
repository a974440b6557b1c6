"""SIGTERM mid-run saves a checkpoint and exits cleanly; rerunning resumes from it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import train
from test_train import TINY, final_params

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_saves_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "--train.steps=100000", f"--train.out_dir={run_dir}", "--eval.every=100000",
            "--eval.at_start=false", "--train.checkpoint_every=100000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "training did not start in time"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out  # saved but unfinished: not a success
    assert "SIGTERM received: saving a checkpoint" in out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith('{"start_step"')))
    assert summary["stopped_by"] == "SIGTERM"
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is False  # what sweeps read
    stopped_at = summary["step"]
    step, _ = final_params(run_dir)
    assert step == stopped_at >= 2

    resumed = train.main([*args, f"--train.stop_at_step={stopped_at + 2}"])
    assert resumed["start_step"] == stopped_at and resumed["step"] == stopped_at + 2
    assert final_params(run_dir)[0] == stopped_at + 2
