"""Sweeps: train.py's overrides as swept and fixed keys, grid expansion, every point checked by
the config's types before any trains, duplicate values trained once, commands for schedulers, a
Slurm job array whose tasks (run by bash) train a tiny sweep that the sweep then only collects, the
Slurm launch script, a real tiny sweep that skips, resumes, records a diverged point, and writes its table and plots;
tables built from each point's own records (unfinished points show no loss, a changed grid keeps
the earlier points' rows); real sweep processes: a refused value is one error line, a second sweep
into a busy --out is refused, a SIGTERM stops the child with a checkpoint, a SIGKILLed sweep
leaves no child training, and reruns resume and finish every point."""

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import train
from recipes.experiments.sweeps import SweepError, collect, commands, make_spec, point_name, wandb_sweep_yaml
from recipes.train.cli import EXIT_CODES, one_line, ordinary_errors
from tests.helpers import logged_lines, one_error_line, process_env, run_script

from scripts import plot_sweep, sweep

ROOT = Path(__file__).resolve().parents[2]

TINY = ["--model.size=tiny", "--data.seq_len=32", "--data.global_batch=16", "--optimizer.schedule.warmup_steps=1",
        "--eval.batches=2", "--eval.every=2", "--train.steps=4", "--train.checkpoint_every=2",
        "--logging.progress=false", "--mesh.devices=1"]


def cli_spec(overrides: list[str], **kwargs):
    """The spec scripts/sweep.py makes of these overrides (and its other flags as ``kwargs``)."""
    swept, fixed = sweep.split_overrides(overrides)
    return make_spec(**{"config": "shakespeare_celo2.yaml", "workers": None, "swept": swept, "fixed": fixed} | kwargs)


def grid_file(tmp_path: Path, grid: dict) -> str:
    """A sweep file holding only ``grid``: a key swept over one value is written there (an override
    with one value is a fixed setting)."""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"grid": grid}))
    return str(path)


def test_overrides_split_into_swept_and_fixed_keys():
    rules = "[{group: adamw, pattern: bias}, {group: main, min_rank: 2}]"
    assert sweep.split_overrides(["--optimizer.lr=1e-3, 3e-3", "--train.steps", "500", "--model.foo=[1,2]",
                                  "--optimizer.routing.rules", rules, "--data.path='a,b'", "--data.name="]) == (
        {"optimizer.lr": ["1e-3", "3e-3"]},
        {"train.steps": "500", "model.foo": "[1,2]", "optimizer.routing.rules": rules, "data.path": "'a,b'",
         "data.name": ""})
    # Lists are swept as whole values; a comma inside quotes splits nothing.
    assert sweep.split_overrides(["--model.foo", "[1,2],[3]", "--data.path", '"a,b",c']) == (
        {"model.foo": ["[1,2]", "[3]"], "data.path": ['"a,b"', "c"]}, {})
    # As in YAML, a quote opens a string only at a value's start; a stray bracket does not stop splitting.
    assert sweep.split_values("it's,that's") == ["it's", "that's"]
    assert sweep.split_values("a],b,[c") == ["a]", "b", "[c"]


def test_grid_expansion(tmp_path):
    spec = cli_spec(["--optimizer.lr=1e-3,3e-3", "--optimizer.name", "celo2,adamw,muon", "--train.steps=500"],
                    out=str(tmp_path))
    points = spec.points()
    assert len(points) == 6 and points[0] == {"optimizer.lr": "1e-3", "optimizer.name": "celo2"}
    assert len({point_name(p) for p in points}) == 6
    lines = commands(spec)
    assert lines[0] == (f"python train.py --config shakespeare_celo2.yaml --train.steps=500 --optimizer.lr=1e-3 "
                        f"--optimizer.name=celo2 --train.out_dir={tmp_path}/lr=1e-3,name=celo2")
    document = yaml.safe_load(wandb_sweep_yaml(spec))
    assert document["method"] == "grid"
    assert document["parameters"]["optimizer.name"]["values"] == ["celo2", "adamw", "muon"]
    assert document["parameters"]["train.steps"] == {"value": 500}


def test_sweep_file_with_flag_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"config": "base.yaml", "grid": {"optimizer.lr": [0.001, 0.01]},
                                    "set": {"train.steps": 10}, "out": str(tmp_path / "o"), "workers": 2}))
    path.write_text(path.read_text().replace("base.yaml", "shakespeare_celo2.yaml"))
    spec = cli_spec(["--optimizer.weight_decay=0,0.1", "--train.steps=20"], config=None, out=None,
                    sweep_file=str(path))
    assert spec.grid == {"optimizer.lr": ["0.001", "0.01"], "optimizer.weight_decay": ["0", "0.1"]}
    assert spec.overrides == {"train.steps": "20"} and spec.workers == 2
    # An override replaces the file's entry for its key, swept or fixed.
    spec = cli_spec(["--optimizer.lr=3e-3", "--train.steps=5,10"], config=None, out=None, sweep_file=str(path))
    assert spec.grid == {"train.steps": ["5", "10"]} and spec.overrides == {"optimizer.lr": "3e-3"}
    path.write_text(yaml.safe_dump({"config": "shakespeare_celo2.yaml", "grid": {"optimizer.lr": [1, 2]},
                                    "set": {"optimizer.lr": 3}, "out": str(tmp_path / "o")}))
    with pytest.raises(SweepError, match=r"\['optimizer.lr'\] are both swept \(grid:\) and fixed \(set:\)"):
        cli_spec([], config=None, out=None, sweep_file=str(path))


@pytest.mark.parametrize("overrides, kwargs, message", [
    (["--lr=1,2"], {}, r"^unexpected argument '--lr=1,2'; overrides look like --section.key=value"),
    (["optimizer.lr=1,2"], {}, "unexpected argument 'optimizer.lr=1,2'"),
    (["--optimizer.lr=1,2", "--train.steps"], {}, "^override --train.steps has no value; write --train.steps=VALUE$"),
    (["--optimizer.lr=1,,2"], {}, "empty value"),
    (["--optimizer.lr=1e-3,"], {}, "^--optimizer.lr=1e-3, has an empty value; separate a swept key's values with "
                                   "commas: --optimizer.lr=a,b,c$"),
    (["--optimizer.lr=1e-3", "--optimizer.lr=3e-3"], {},
     r"^--optimizer.lr is given twice \(1e-3 and 3e-3\); give all its values in one: --optimizer.lr=1e-3,3e-3$"),
    # A later fixed value of a swept key is a key given twice, not a value that wins.
    (["--optimizer.lr=1e-3,3e-3", "--train.steps=5", "--optimizer.lr", "1e-2"], {},
     r"^--optimizer.lr is given twice \(1e-3,3e-3 and 1e-2\); give all its values in one: "
     r"--optimizer.lr=1e-3,3e-3,1e-2$"),
    # The flags that came before train.py's form: one line naming the override that replaces them.
    (["--grid", "optimizer.lr=1e-3,3e-3"], {}, "^--grid is gone: write --optimizer.lr=1e-3,3e-3$"),
    (["--optimizer.lr=1,2", "--grid"], {}, "^--grid is gone: write --section.key=v1,v2$"),
    (["--dry-run", "--optimizer.lr=1,2"], {}, "^unexpected argument '--dry-run'; overrides look like"),
    (["--optimizer.lr=1,2", "--set=train.steps=500"], {}, "^--set is gone: write --train.steps=500$"),
    ([], {}, "empty grid"),
    (["--train.steps=500"], {}, "^empty grid: sweep at least one key"),  # one value is a fixed setting
    (["--train.out_dir=a,b"], {}, "set by the sweep"),
    (["--optimizer.lr=1,2", "--train.out_dir=a"], {}, "set by the sweep"),
    (["--optimizer.lr=1,2"], dict(workers=0), "--workers"),
    # Values the config's own types refuse, found before any point trains.
    (["--optimizer.lr=1e-3,abc"], {}, "point optimizer.lr=abc: config key 'optimizer.lr' expects float"),
    (["--optimizer.lr=[],1"], {}, "point optimizer.lr=\\[\\]: config key 'optimizer.lr' expects float, got list"),
    # A bracketed list is one value, not split at its commas.
    (["--optimizer.lr=1e-3,3e-3", "--optimizer.weight_decay=[0,0.1]"], {},
     "point optimizer.lr=1e-3: config key 'optimizer.weight_decay' expects float, got list"),
    (["--optimizer.lr=1,2", "--train.steps=0"], {}, "point optimizer.lr=1: .*train.steps"),
    (["--data.path=a b,a_b"], {}, "share the run directory path=a_b"),
])
def test_bad_sweeps_are_refused(tmp_path, overrides, kwargs, message):
    with pytest.raises(SweepError, match=message):
        cli_spec(overrides, out=str(tmp_path / "sweep"), **kwargs)
    assert not (tmp_path / "sweep").exists()


def test_grid_values_are_deduplicated_by_the_configs_types(tmp_path):
    with logged_lines() as notes:
        spec = cli_spec(["--optimizer.lr=1e-3,0.001,3e-3,3e-3", "--optimizer.weight_decay=0,0.0"],
                        out=str(tmp_path))
    assert spec.grid == {"optimizer.lr": ["1e-3", "3e-3"], "optimizer.weight_decay": ["0"]}
    assert len(commands(spec)) == 2
    assert notes == ["note: optimizer.lr: 0.001 is the same setting as 1e-3; trained once, as lr=1e-3",
                     "note: optimizer.lr: 3e-3 is given twice; trained once, as lr=3e-3",
                     "note: optimizer.weight_decay: 0.0 is the same setting as 0; trained once, as "
                     "weight_decay=0"]
    # Values equal only at some points are kept: both warmups are cut to 10 steps in a 100-step run,
    # not in a 5000-step one.
    spec = cli_spec(["--train.steps=100,5000", "--optimizer.schedule.warmup_steps=1000,2000"], out=str(tmp_path))
    assert spec.grid["optimizer.schedule.warmup_steps"] == ["1000", "2000"]


def test_a_refused_grid_value_is_one_error_line_and_nothing_trains(tmp_path):
    out = tmp_path / "sweep"
    result = run_script("sweep", "--config", "shakespeare_celo2.yaml", "--optimizer.lr=1e-3,abc",
                        "--out", str(out), tmp_path=tmp_path)
    assert result.returncode == 1
    assert "config key 'optimizer.lr' expects float, got str 'abc'" in one_error_line(result)
    assert not out.exists()
    result = run_script("sweep", "--config", "shakespeare_celo2.yaml", "--grid", "optimizer.lr=1e-3,3e-3",
                        "--out", str(out), tmp_path=tmp_path)
    assert result.returncode == 1
    assert one_error_line(result) == "error: --grid is gone: write --optimizer.lr=1e-3,3e-3"
    assert not out.exists()


def test_print_commands_takes_both_override_forms_among_the_sweeps_flags(tmp_path, capsys):
    """--key=value and --key value, before and after the sweep's own flags; a bracketed list with
    commas is one fixed value, which train.py gets as given."""
    out = tmp_path / "sweep"
    rules = "[{group: adamw, pattern: bias}, {group: main, min_rank: 2}]"
    assert sweep.main(["--optimizer.lr", "1e-3,3e-3", "--config", "shakespeare_celo2.yaml", "--train.steps", "500",
                       "--out", str(out), f"--optimizer.routing.rules={rules}", "--print-commands"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        shlex.join(["python", "train.py", "--config", "shakespeare_celo2.yaml", "--train.steps=500",
                    f"--optimizer.routing.rules={rules}", f"--optimizer.lr={lr}", f"--train.out_dir={out}/lr={lr}"])
        for lr in ("1e-3", "3e-3")]
    assert not out.exists()


def in_process_runner(calls):
    """train.main in this process (the real trainer), ending as train.py does: exit 3 after too
    many non-finite steps, 1 with one error line for an ordinary error."""
    def run(argv, log_path):
        calls.append(argv)
        try:
            train.main(argv)
            return 0
        except (train.NonFiniteError, *ordinary_errors()) as error:
            with open(log_path, "a") as log:
                log.write(f"error: {one_line(error)}\n")
            return EXIT_CODES["nonfinite" if isinstance(error, train.NonFiniteError) else "error"]
    return run


@pytest.mark.slow
def test_tiny_sweep_skips_resumes_and_records_divergence(tmp_path, capsys):
    out = tmp_path / "sweep"
    # The optimizer is fixed, not gridded: the table still names it.
    fixed = [*TINY, "--optimizer.name=adamw", "--train.target_val_loss=20"]  # above a fresh model's loss: step 0
    grid = grid_file(tmp_path, {"optimizer.weight_decay": ["0.1"]})  # swept over one value: the heatmap's axis
    args = ["--config", "shakespeare_celo2.yaml", "--sweep", grid, "--optimizer.lr=3e-3,1e3", "--out", str(out),
            *fixed]
    spec = cli_spec(["--optimizer.lr=3e-3,1e3", *fixed], out=str(out), sweep_file=grid)
    good, bad = [out / point_name(p) for p in spec.points()]

    # An interrupted point: its run stopped at step 2 with a checkpoint, before the sweep ran.
    train.main([*spec_argv(spec, spec.points()[0]), "--train.stop_at_step=2"])
    # Its evaluation at step 2 and the other point's nothing are not results.
    assert [(r["status"], r["final_val_loss"]) for r in collect(spec)] == [("interrupted", None), ("pending", None)]

    calls = []
    capsys.readouterr()
    assert sweep.main(args, runner=in_process_runner(calls)) == 0
    assert len(calls) == 2
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"{out / 'results.csv'}: 2 points: 1 finished, 0 unfinished, 1 diverged"
    rows = {r["point"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows[good.name]) >= {"optimizer.lr", "final_val_loss", "best_val_loss", "tokens", "wall_time_s",
                                    "diverged"}
    assert rows[good.name]["diverged"] == "False" and rows[good.name]["status"] == "finished"
    assert float(rows[good.name]["final_val_loss"]) < float(rows[good.name]["initial_val_loss"])
    assert rows[good.name]["steps"] == "4" and int(rows[good.name]["tokens"]) == 4 * 16 * 32
    assert rows[bad.name]["diverged"] == "True"
    assert _resumed(good)
    assert (out / "heatmap_final_val_loss.png").stat().st_size > 0 and (out / "loss_vs_lr.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())[0]["point"] == good.name
    table = (out / "results.md").read_text()
    assert f"| adamw | {float(rows[good.name]['final_val_loss']):.3f} |" in table  # adamw's best: its finite point
    assert "| div |" in table  # the diverged learning rate's cell
    assert rows[good.name]["target_step"] == "0" and rows[good.name]["target_tokens"] == "0"
    assert "steps to target" in table and "| 0 (" in table and "; 2 of 2, median 0 |" in table

    # Rerunning skips finished points.
    calls.clear()
    assert sweep.main(args, runner=in_process_runner(calls)) == 0
    assert calls == []

    # The same directory with other fixed settings is refused rather than mixed.
    with pytest.raises(SweepError, match="choose another --out"):
        sweep.main([*args, "--train.seed=1"], runner=in_process_runner(calls))
    assert calls == []

    (out / "loss_vs_lr.png").unlink()
    assert plot_sweep.main([str(out)]) == 0 and (out / "loss_vs_lr.png").is_file()


def spec_argv(spec, point):
    from recipes.experiments.sweeps import train_argv
    return train_argv(spec, point)


def _resumed(run_dir: Path) -> bool:
    """The second run continued from the step-2 checkpoint instead of starting over (which
    would log steps 0 and 2 twice)."""
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in log if "val_loss" in r] == [0, 2, 4] and [r["step"] for r in log if "loss" in r] == [2, 4]


def test_the_table_takes_finished_from_the_points_own_summary(tmp_path, tiny_run):
    """point.json is the sweep's note of how its last child ended; a run's summary.json says
    whether it finished, and wins (a stale "failed" never hides a finished point)."""
    spec = cli_spec(["--optimizer.lr=1,2,3,4"], out=str(tmp_path))
    cases = [({"status": "failed"}, {"finished": True}, "finished"),
             ({}, {"finished": False, "stopped_by": "nonfinite"}, "diverged"),
             ({}, {"finished": False, "stopped_by": "SIGTERM"}, "interrupted"),
             ({}, {}, "pending")]
    for point, (record, summary, _) in zip(spec.points(), cases):
        run_dir = tmp_path / point_name(point)
        run_dir.mkdir()
        for name, value in (("point.json", record), ("summary.json", summary)):
            if value:
                (run_dir / name).write_text(json.dumps(value))
    shutil.copy(tiny_run / "metrics.jsonl", tmp_path / point_name(spec.points()[0]))  # its trained steps
    assert [row["status"] for row in collect(spec)] == [expected for *_, expected in cases]


def finished_point(run_dir: Path, tiny_run: Path) -> None:
    """A finished point's records: those of the session's tiny trained run."""
    run_dir.mkdir(parents=True)
    for name in ("metrics.jsonl", "summary.json", "config.yaml"):
        shutil.copy(tiny_run / name, run_dir / name)


def test_a_point_without_a_trained_step_is_never_finished(tmp_path, tiny_run, capsys):
    """A point whose directory was deleted while it trained: the trainer recreated checkpoints/ and a
    summary.json saying finished, and the sweep wrote point.json; no metrics.jsonl says it trained.
    It is not finished, shows no loss, and a rerun skips it with what to do rather than training
    nothing again."""
    out = tmp_path / "sweep"
    finished_point(out / "lr=1e-3", tiny_run)
    lost = out / "lr=2e-3"
    (lost / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "summary.json", lost)
    (lost / "point.json").write_text(json.dumps({"status": "finished", "exit_code": 0, "runs": 1}))
    calls = []
    args = ["--config", "shakespeare_celo2.yaml", "--optimizer.lr=1e-3,2e-3", "--out", str(out)]
    assert sweep.main(args, runner=in_process_runner(calls)) == 1
    assert calls == []
    printed = capsys.readouterr().out
    assert f"skip   lr=2e-3 (records missing: its summary.json says finished but its metrics.jsonl holds no " \
           f"trained step; delete {lost} and rerun to train it again)" in printed
    assert printed.splitlines()[-1] == (f"{out / 'results.csv'}: 2 points: 1 finished, 1 unfinished, 0 diverged; "
                                        "records missing: lr=2e-3")
    rows = {r["point"]: r for r in results(out)}
    assert rows["lr=2e-3"]["status"] == "records missing" and rows["lr=2e-3"]["tokens"] == "0"
    assert rows["lr=2e-3"]["final_val_loss"] == "" and rows["lr=1e-3"]["status"] == "finished"
    assert "| n/a |" in (out / "results.md").read_text()


def test_unfinished_points_show_no_final_loss_and_the_last_line_counts_them(tmp_path, tiny_run, capsys):
    """A sweep stopped before its second point trained a step (the trainer had evaluated the fresh
    model) and its third began: their initial loss is no result in the tables."""
    out = tmp_path / "sweep"
    (out / "sweep.json").parent.mkdir()
    (out / "sweep.json").write_text(json.dumps({"config": "shakespeare_celo2.yaml", "set": {},
                                                "grid": {"optimizer.lr": ["1e-3", "2e-3", "3e-3"]}}))
    finished_point(out / "lr=1e-3", tiny_run)
    stopped = out / "lr=2e-3"
    stopped.mkdir()
    initial = 10.835
    (stopped / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": initial}) + "\n")
    (stopped / "summary.json").write_text(json.dumps({"finished": False, "stopped_by": "SIGTERM", "step": 0}))
    assert plot_sweep.main([str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"{out / 'results.csv'}: 3 points: 1 finished, 2 unfinished, 0 diverged"
    rows = {r["point"]: r for r in results(out)}
    assert [rows[p]["status"] for p in ("lr=1e-3", "lr=2e-3", "lr=3e-3")] == ["finished", "interrupted", "pending"]
    assert rows["lr=2e-3"]["final_val_loss"] == "" and float(rows["lr=2e-3"]["initial_val_loss"]) == initial
    table = (out / "results.md").read_text()
    assert f"{float(rows['lr=1e-3']['final_val_loss']):.3f}" in table and f"{initial:.3f}" not in table


def test_a_rerun_with_a_changed_grid_keeps_the_earlier_points(tmp_path, tiny_run, capsys):
    out = tmp_path / "sweep"
    finished_point(out / "lr=1e-3", tiny_run)
    finished_point(out / "lr=2e-3", tiny_run)
    earlier = {"optimizer.lr": ["1e-3", "2e-3", "3e-3"]}  # lr=3e-3 never started: no directory, no row
    (out / "sweep.json").write_text(json.dumps({"config": "shakespeare_celo2.yaml", "set": {}, "grid": earlier}))
    calls = []
    grid = grid_file(tmp_path, {"optimizer.lr": ["1e-3"]})
    assert sweep.main(["--config", "shakespeare_celo2.yaml", "--sweep", grid, "--out", str(out)],
                      runner=in_process_runner(calls)) == 0
    assert calls == []
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{out / 'results.csv'}: 1 point: 1 finished, 0 unfinished, 0 diverged; "
        "1 earlier point outside the grid kept (in_grid False)")
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["grid"] == {"optimizer.lr": ["1e-3"]} and saved["earlier_grids"] == [earlier]
    expected = [("lr=1e-3", "finished", "True"), ("lr=2e-3", "finished", "False")]
    assert [(r["point"], r["status"], r["in_grid"]) for r in results(out)] == expected
    table = (out / "results.md").read_text()
    assert "| lr 1e-3 |" in table and "| lr 2e-3 |" not in table
    assert "outside the current grid (their rows are in results.csv): lr=2e-3 (finished)" in table
    assert plot_sweep.main([str(out)]) == 0  # rebuilt from the run directories and sweep.json's history
    assert [(r["point"], r["status"], r["in_grid"]) for r in results(out)] == expected


def test_a_points_outcome_comes_from_its_exit_code_not_its_log(tmp_path):
    """A point whose earlier run skipped a non-finite step, then failed for another reason (its
    data is missing): failed, not diverged, and a rerun tries it again."""
    out = tmp_path / "sweep"
    run_dir = out / "lr=3e-3"
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text("step 3: non-finite loss nan or gradient norm nan; skipped (1 in a row)\n")
    args = ["--config", "shakespeare_celo2.yaml", "--sweep", grid_file(tmp_path, {"optimizer.lr": ["3e-3"]}),
            "--out", str(out), f"--data.path={tmp_path / 'no_data'}"]
    calls = []
    assert sweep.main(args, runner=in_process_runner(calls)) == 1
    assert [(r["status"], r["diverged"]) for r in results(out)] == [("failed", "False")]
    assert sweep.main(args, runner=in_process_runner(calls)) == 1
    assert len(calls) == 2


# A real sweep of one point, long enough to be caught training (a metrics row per step).
def replaced(overrides: list[str], *others: str) -> list[str]:
    """``overrides`` with ``others`` in place of those of the same keys (a sweep refuses a key given twice)."""
    keys = {other.partition("=")[0] for other in others}
    return [*(o for o in overrides if o.partition("=")[0] not in keys), *others]


LIVE = replaced(TINY, "--optimizer.name=adamw", "--train.steps=20", "--train.checkpoint_every=10", "--eval.every=20",
                "--eval.at_start=false", "--logging.every=1", "--sample.max_new_tokens=0")


def sweep_command(out: Path) -> list[str]:
    return [sys.executable, "scripts/sweep.py", "--config", "shakespeare_celo2.yaml", "--sweep",
            grid_file(out.parent, {"optimizer.lr": ["3e-3"]}), "--out", str(out), *LIVE]


def sweep_env(tmp_path: Path) -> dict:
    return {**process_env(), "PYTHONUNBUFFERED": "1"}


def start_sweep(tmp_path: Path, out: Path, name: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        return subprocess.Popen(sweep_command(out), cwd=ROOT, env=sweep_env(tmp_path), stdout=f,
                                stderr=subprocess.STDOUT), log


def wait_for(condition, process: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            pytest.fail(f"{what} did not happen (exit {process.poll()}): {log.read_text()[-3000:]}")
        time.sleep(0.1)


def _text(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def training_child(run_dir: Path, sweep_process: subprocess.Popen, log: Path) -> int:
    """The pid of the train.py child once it is in its training loop, stopped there (SIGSTOP)
    so that a signal reaches it mid-run however fast this machine trains."""
    def training() -> bool:
        return _text(run_dir / ".lock").startswith("pid ") and '"loss"' in _text(run_dir / "metrics.jsonl")
    wait_for(training, sweep_process, log, "a training train.py child")
    pid = int(_text(run_dir / ".lock").split()[1])
    os.kill(pid, signal.SIGSTOP)
    return pid


def alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie, ended but not reaped by its new parent, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def end_all(processes: list[subprocess.Popen], pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def results(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "results.csv")))


def finish_by_rerun(tmp_path: Path, out: Path, run_dir: Path, stopped_at: int) -> None:
    """A rerun of the same command resumes the point at its checkpoint and finishes it."""
    rerun = subprocess.run(sweep_command(out), cwd=ROOT, env=sweep_env(tmp_path), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert [r["status"] for r in results(out)] == ["finished"] and results(out)[0]["steps"] == "20"
    assert f"resumed {run_dir} at step {stopped_at}" in _text(run_dir / "train.log")
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is True


@pytest.mark.slow
def test_a_second_sweep_is_refused_and_sigterm_stops_the_child_with_a_checkpoint(tmp_path):
    out = tmp_path / "sweep"
    run_dir = out / "lr=3e-3"
    first, log = start_sweep(tmp_path, out, "first")
    child = None
    try:
        child = training_child(run_dir, first, log)
        assert _text(out / ".lock") == f"pid {first.pid}"

        # A second sweep into the same --out: one line naming the holder, and the folder untouched.
        def snapshot():
            return {e.name: None if e.is_dir() else (e.read_bytes(), e.stat().st_mtime_ns) for e in out.iterdir()}
        before = snapshot()
        second = subprocess.run(sweep_command(out), cwd=ROOT, env=sweep_env(tmp_path), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 1
        assert f"is in use by pid {first.pid}" in one_error_line(second)
        assert snapshot() == before

        # SIGTERM to the sweep goes on to its child, which saves a checkpoint and exits 143; so does the sweep.
        first.send_signal(signal.SIGTERM)
        os.kill(child, signal.SIGCONT)
        assert first.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        end_all([first], [child] if child else [])
    assert not alive(child)
    assert "SIGTERM received" in log.read_text()
    assert f"{out / 'results.csv'}: 1 point: 0 finished, 1 unfinished, 0 diverged" in log.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["finished"] is False
    assert (run_dir / "checkpoints" / str(summary["step"])).is_dir()
    assert [r["status"] for r in results(out)] == ["interrupted"]  # not failed: the rerun resumes it
    finish_by_rerun(tmp_path, out, run_dir, summary["step"])


@pytest.mark.slow
def test_a_killed_sweep_leaves_no_child_training_and_a_rerun_adopts_the_point(tmp_path):
    out = tmp_path / "sweep"
    run_dir = out / "lr=3e-3"
    first, log = start_sweep(tmp_path, out, "first")
    rerun, rerun_log = None, tmp_path / "rerun.log"
    child = None
    try:
        child = training_child(run_dir, first, log)
        first.kill()  # SIGKILL: the sweep can pass nothing on; the kernel sends the child SIGTERM
        first.wait()
        # A rerun at once finds the point still locked by the (stopped) orphan: it waits, not fails.
        rerun, rerun_log = start_sweep(tmp_path, out, "rerun")
        wait_for(lambda: f"pid {child} is still training it" in rerun_log.read_text(), rerun, rerun_log,
                 "the rerun waiting for the orphan")
        os.kill(child, signal.SIGCONT)
        deadline = time.time() + 60
        while alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the killed sweep's child is still training"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["stopped_by"] == "SIGTERM" and summary["finished"] is False  # it saved on the way out
        assert rerun.wait(timeout=600) == 0, rerun_log.read_text()[-3000:]
    finally:
        end_all([p for p in (first, rerun) if p], [child] if child else [])
    assert [r["status"] for r in results(out)] == ["finished"] and results(out)[0]["steps"] == "20"
    assert f"resumed {run_dir} at step {summary['step']}" in _text(run_dir / "train.log")


def test_a_slurm_job_array_trains_each_point_and_the_sweep_then_only_collects(tmp_path, capsys):
    """--slurm-array writes one array task per point running its train.py command; each task runs
    as Slurm starts it (bash with SLURM_ARRAY_TASK_ID); the same sweep command then trains nothing
    and writes the table."""
    out, array = tmp_path / "sweep", tmp_path / "sweep.sbatch"
    fixed = [*TINY, "--optimizer.name=adamw", "--sample.max_new_tokens=0"]
    args = ["--config", "shakespeare_celo2.yaml", "--optimizer.lr=3e-3,1e-2", "--out", str(out), *fixed]
    assert sweep.main([*args, "--slurm-array", str(array)]) == 0
    text = array.read_text()
    assert "#SBATCH --array=0-1" in text and f"#SBATCH --output={out}/slurm-%A_%a.out" in text and out.is_dir()
    spec = cli_spec(["--optimizer.lr=3e-3,1e-2", *fixed], out=str(out))
    for index, line in enumerate(commands(spec)):  # the commands --print-commands prints
        assert f'  {index}) exec "$PYTHON" {line.removeprefix("python ")} ;;' in text

    for task in ("0", "1"):
        result = subprocess.run(["bash", str(array)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                                env={**process_env(), "SLURM_ARRAY_TASK_ID": task})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wrong = subprocess.run(["bash", str(array)], env={**process_env(), "SLURM_ARRAY_TASK_ID": "2"},
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1
    assert one_error_line(wrong) == "error: SLURM_ARRAY_TASK_ID='2' is not a point of this sweep (0 to 1)"

    calls = []
    capsys.readouterr()
    assert sweep.main(args, runner=in_process_runner(calls)) == 0
    assert calls == []  # both points finished: nothing is trained again
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"{out / 'results.csv'}: 2 points: 2 finished, 0 unfinished, 0 diverged"
    rows = results(out)
    assert [(r["point"], r["status"], r["steps"]) for r in rows] == [("lr=3e-3", "finished", "4"),
                                                                     ("lr=1e-2", "finished", "4")]
    assert all(float(r["final_val_loss"]) < float(r["initial_val_loss"]) for r in rows)

    with pytest.raises(SweepError, match="exists: choose a new file for --slurm-array"):
        sweep.main([*args, "--slurm-array", str(array)])


def test_the_slurm_gpu_script_passes_the_recipe_and_requeues_after_a_signal_checkpoint(tmp_path):
    """scripts/launch/slurm_gpu.sbatch is valid bash; with stand-ins for srun and scontrol, its one
    srun runs train.py with the recipe and the extra arguments, and an exit 143 (stopped with a
    checkpoint) requeues the job while an exit 0 does not."""
    script = ROOT / "scripts" / "launch" / "slurm_gpu.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "#SBATCH --ntasks-per-node=1" in script.read_text() and "#SBATCH --gpus-per-node=8" in script.read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", 'echo "srun $*"; exit "$SRUN_EXIT"'), ("scontrol", 'echo "scontrol $*"')):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in process_env().items() if k != "PYTHON"}  # the script's default interpreter
    env |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_ON_NODE": "96"}
    for code, requeued in ((143, True), (0, False)):
        result = subprocess.run(["bash", str(script), "gpt3xl_celo2.yaml", "--train.out_dir=runs/a b"],
                                env={**env, "SRUN_EXIT": str(code)}, capture_output=True, text=True, timeout=60)
        assert result.returncode == code
        assert result.stdout.splitlines()[0] == ("srun --cpus-per-task=96 --kill-on-bad-exit=0 .venv/bin/python "
                                                 "train.py --config gpt3xl_celo2.yaml --train.out_dir=runs/a b")
        assert ("scontrol requeue 77" in result.stdout) == requeued
