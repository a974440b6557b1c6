"""What a rerun into an existing run directory may change, each driven through a real train.py process:
a resume never gives the checkpoints' parameters another meaning, a rerun that trains nothing changes
nothing, and the run writes only regular files inside its own directory."""
import shutil
import signal
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY, final_params, one_error_line, process_env, train_process


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run trained to its end, step 4 (read-only: tests copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = train_process(run_dir, "--train.steps=4", "--train.checkpoint_every=2")
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


def copy_of(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_a_resume_that_changes_what_the_parameters_mean_is_refused(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    before = snapshot(run_dir)
    refused = train_process(run_dir, "--train.steps=6", "--model.n_head=2")  # the same arrays, another function
    assert refused.returncode == 1
    assert "change what the parameters or the optimizer state mean (model.n_head 4 -> 2)" in one_error_line(refused)
    assert snapshot(run_dir) == before

    # How the step is computed is not what the parameters mean: resumed, with a note naming it.
    resumed = train_process(run_dir, "--train.steps=6", "--model.remat=full", "--eval.batches=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "with changed settings: eval.batches 2 -> 1, model.remat 'none' -> 'full'" in resumed.stdout
    assert final_params(run_dir)[0] == 6


def test_a_rerun_that_trains_nothing_changes_nothing(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    before = snapshot(run_dir)
    rerun = train_process(run_dir, "--train.steps=4", "--train.checkpoint_every=2", "--optimizer.lr=1e-3")
    assert rerun.returncode == 0 and "nothing to train" in rerun.stdout
    assert snapshot(run_dir) == before  # config.yaml still says how the checkpoints were trained


def test_a_symbolic_link_in_the_run_directory_is_refused_and_its_target_untouched(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("the user's own file\n")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to(outside)
    refused = train_process(run_dir, "--train.steps=6")
    assert refused.returncode == 1
    assert f"holds a symbolic link, {run_dir / 'metrics.jsonl'} -> {outside}" in one_error_line(refused)
    assert outside.read_text() == "the user's own file\n" and final_params(run_dir)[0] == 4


def test_a_run_directory_inside_another_run_is_refused(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    inside = run_dir / "checkpoints" / "4" / "run"
    refused = train_process(inside, "--train.steps=2")
    assert refused.returncode == 1
    assert f"lies inside the run directory {run_dir}" in one_error_line(refused)
    assert not inside.exists()


def test_rows_of_metrics_jsonl_a_trainer_did_not_write_are_set_aside_on_resume(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('42\n{"step": "seven"}\n{"step": 3, "wall_time_s": "late"}\n')
    resumed = train_process(run_dir, "--train.steps=6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "metrics.set_aside.jsonl").read_text() == \
        '42\n{"step": "seven"}\n{"step": 3, "wall_time_s": "late"}\n'  # kept, never deleted


def test_a_sigterm_during_start_up_stops_in_one_line_and_the_rerun_trains(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "--train.steps=4", f"--train.out_dir={run_dir}"]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=process_env())
    for line in process.stdout:
        if line.startswith("mesh "):  # printed before the state is built and the step compiled
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.strip() == "SIGTERM received before training began: stopped, nothing was trained; rerun to start or resume"
    assert "step 1" not in out and not list(run_dir.glob("checkpoints/*")) and not (run_dir / "config.yaml").exists()
    rerun = train_process(run_dir, "--train.steps=4")
    assert rerun.returncode == 0 and final_params(run_dir)[0] == 4
