"""Faults met by real train.py processes (a diverging learning rate, a changed model, SIGTERM, a second
process on the directory, a damaged checkpoint, a tiny validation split): each ends in its documented
exit code and, where it fails, one `error:` line without a traceback, and leaves a run directory that
resumes, to the same loss as an undisturbed run where that is possible."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, TINY, final_params, one_error_line, process_env, train_process


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


def test_signal_second_process_and_damaged_checkpoint_then_the_same_loss_as_an_undisturbed_run(tmp_path):
    run_dir = tmp_path / "run"
    long = ["--train.steps=100000", "--optimizer.schedule.kind=constant"]  # the lr does not depend on the end
    env = process_env()
    args = [*TINY, "--train.checkpoint_every=4", "--train.keep_checkpoints=2", "--optimizer.schedule.warmup_steps=0",
            "--eval.at_start=false", *long]
    stdout, stderr = tmp_path / "first.out", tmp_path / "first.err"
    with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
        first = subprocess.Popen([sys.executable, "train.py", *args, f"--train.out_dir={run_dir}"], cwd=ROOT,
                                 env=env, stdout=out_file, stderr=err_file)
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "8").is_dir():
            if first.poll() is not None or time.time() > deadline:
                first.kill()
                pytest.fail(f"no checkpoint at step 8: {stderr.read_text()[-3000:]}")
            time.sleep(0.2)
        second = train_process(run_dir, *long)  # a second trainer on a live run directory
        assert second.returncode == 1 and f"is in use by pid {first.pid}" in one_error_line(second)
        # SIGTERM, then again every 20 ms until it exits: one stop can bring several (a scheduler's;
        # Linux's parent-death signal, once per thread of a dead sweep), and it still saves.
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline:
            first.send_signal(signal.SIGTERM)
            time.sleep(0.02)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.wait() == 128 + signal.SIGTERM, stderr.read_text()[-3000:]  # saved but unfinished: not a success
    assert "SIGTERM received: saving a checkpoint" in stdout.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["finished"] is False  # what sweeps read
    stopped_at = summary["step"]
    assert final_params(run_dir)[0] == stopped_at
    # Asked for fewer steps than it holds, the stopped run has nothing left to train: exit 0, not the
    # signal's code again (a scheduler requeueing on 143 would loop).
    shorter = train_process(run_dir, *long, "--train.steps=2")
    assert shorter.returncode == 0 and "nothing to train" in shorter.stdout, shorter.stderr[-2000:]

    # The newest checkpoint's arrays cut short: the next older one resumes, and the run ends where an
    # undisturbed one does.
    for f in (run_dir / "checkpoints" / str(stopped_at) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    end = f"--train.stop_at_step={stopped_at + 4}"
    resumed = train_process(run_dir, *long, end)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint {stopped_at} does not restore" in resumed.stdout
    undisturbed = train_process(tmp_path / "undisturbed", *long, end)
    assert undisturbed.returncode == 0, undisturbed.stderr[-3000:]
    losses = [json.loads((d / "summary.json").read_text())["val_loss"] for d in (run_dir, tmp_path / "undisturbed")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)

    # The newest checkpoint's arrays deleted: the next older one resumes.
    shutil.rmtree(run_dir / "checkpoints" / str(stopped_at + 4) / "state")
    again = train_process(run_dir, *long, f"--train.stop_at_step={stopped_at + 6}")
    assert again.returncode == 0 and f"checkpoint {stopped_at + 4} does not restore" in again.stdout
    assert final_params(run_dir)[0] == stopped_at + 6

    # A validation split too small for one batch: said, and the summary stays strict JSON.
    small = train_process(tmp_path / "small", "--train.steps=2", "--eval.batch_size=4096")
    assert small.returncode == 0 and "the val split holds no full batch" in small.stdout
    summary = json.loads((tmp_path / "small" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["val_loss"] is None and summary["finished"]
