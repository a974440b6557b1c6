"""Sweeps: grid expansion and parsing, commands for schedulers, a real tiny sweep that skips,
resumes, records a diverged point, and writes its table and plots."""

import csv
import json
from pathlib import Path

import pytest
import yaml

import train
from recipes.experiments.sweeps import SweepError, commands, make_spec, parse_grid, point_name, wandb_sweep_yaml

from scripts import plot_sweep, sweep

TINY = ["model.size=tiny", "data.seq_len=32", "data.global_batch=16", "optimizer.schedule.warmup_steps=1",
        "eval.batches=2", "eval.every=2", "train.steps=4", "train.checkpoint_every=2",
        "logging.progress=false", "mesh.devices=1"]


def test_grid_parsing_and_expansion(tmp_path):
    assert parse_grid("optimizer.lr=1e-3, 3e-3") == ("optimizer.lr", ["1e-3", "3e-3"])
    spec = make_spec(config="shakespeare_celo2.yaml", grids=["optimizer.lr=1e-3,3e-3", "optimizer.name=celo2,adamw,muon"],
                     sets=["train.steps=500"], out=str(tmp_path), workers=None)
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
    spec = make_spec(config=None, grids=["optimizer.weight_decay=0,0.1"], sets=["train.steps=20"], out=None,
                     workers=None, sweep_file=str(path))
    assert spec.grid == {"optimizer.lr": ["0.001", "0.01"], "optimizer.weight_decay": ["0", "0.1"]}
    assert spec.overrides == {"train.steps": "20"} and spec.workers == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(grids=["lr=1"]), "section.key=value"),
    (dict(grids=["optimizer.lr=1,,2"]), "empty value"),
    (dict(grids=["optimizer.lr=1,1"]), "repeats"),
    (dict(grids=[]), "empty grid"),
    (dict(grids=["optimizer.lr=1"], sets=["optimizer.lr=2"]), "both swept"),
    (dict(grids=["train.out_dir=a,b"]), "set by the sweep"),
    (dict(grids=["optimizer.lr=1"], workers=0), "--workers"),
])
def test_bad_sweeps_are_refused(tmp_path, kwargs, message):
    args = dict(config="base.yaml", grids=[], sets=[], out=str(tmp_path), workers=None) | kwargs
    with pytest.raises(SweepError, match=message):
        make_spec(**args)


def in_process_runner(calls):
    """train.main in this process (the real trainer), with the command line's exit codes."""
    def run(argv, log_path):
        calls.append(argv)
        try:
            train.main(argv)
            return 0
        except train.NonFiniteError as error:  # train.py prints this and exits 1
            log_path.write_text(f"error: {error}\n")
            return 1
    return run


def test_tiny_sweep_skips_resumes_and_records_divergence(tmp_path):
    out = tmp_path / "sweep"
    # The optimizer is fixed with --set, not gridded: the table still names it.
    sets = [*TINY, "optimizer.name=adamw", "train.target_val_loss=20"]  # above a fresh model's loss: step 0
    args = ["--config", "shakespeare_celo2.yaml", "--grid", "optimizer.lr=3e-3,1e3",
            "--grid", "optimizer.weight_decay=0.1", "--out", str(out), *[f"--set={s}" for s in sets]]
    spec = make_spec(config="shakespeare_celo2.yaml", grids=["optimizer.lr=3e-3,1e3", "optimizer.weight_decay=0.1"],
                     sets=sets, out=str(out), workers=None)
    good, bad = [out / point_name(p) for p in spec.points()]

    # An interrupted point: its run stopped at step 2 with a checkpoint, before the sweep ran.
    train.main([*spec_argv(spec, spec.points()[0]), "--train.stop_at_step=2"])

    calls = []
    assert sweep.main(args, runner=in_process_runner(calls)) == 0
    assert len(calls) == 2
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
        sweep.main([*args, "--set=train.seed=1"], runner=in_process_runner(calls))
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
