"""End-to-end runs of train.main in-process on the tiny model: learning, exact resume,
non-finite steps, metrics, W&B offline and --dry-run."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import train
from model.config_base import ConfigError
from tests.helpers import TINY, final_params, recipe_setting, records, run_at_once


def run(tmp_path: Path, *extra: str, name: str = "run") -> dict:
    return train.main([*TINY, f"--train.out_dir={tmp_path / name}", *extra])


def test_loss_falls_and_run_dir_is_complete(tmp_path, monkeypatch):
    """Also: W&B in offline mode writes a local run, and optimizer diagnostics are logged."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = run(tmp_path, "--train.steps=12", "--eval.every=6", "--logging.wandb=offline",
                  "--logging.diagnostics=true")
    run_dir = tmp_path / "run"
    log = records(run_dir)
    train_losses = [r["loss"] for r in log if "loss" in r]
    val_losses = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(train_losses) == 12 and len(val_losses) == 3  # steps 0, 6, 12
    assert train_losses[-1] < train_losses[0] - 0.5
    assert val_losses[-1] < val_losses[0] - 0.5
    assert summary["step"] == 12 and summary["val_loss"] == pytest.approx(val_losses[-1])
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is True
    first = log[1]
    assert {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu"} <= set(first)
    assert first["mfu"] is None  # no peak FLOP/s for CPUs
    assert (run_dir / "config.yaml").is_file() and (run_dir / "routing.txt").is_file()
    assert json.loads((run_dir / "routing.json").read_text())["optimizer"] == "adamw"
    assert final_params(run_dir)[0] == 12
    assert {"update_rms/adamw", "update_param_ratio/all", "update_grad_cos/all"} <= set(first)
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and any(wandb_runs[0].rglob("*.wandb"))


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """6 steps straight == resuming the same run from its step-3 checkpoint: bitwise, with
    Celo2 (the default recipe's optimizer and shipped theta) and gradient accumulation."""
    import shutil

    common = ["--train.steps=6", "--data.micro_batch=4", "--optimizer.name=celo2",
              "--optimizer.theta=celo2_lm", "--eval.at_start=false",
              "--train.checkpoint_every=3", "--train.keep_checkpoints=2"]
    run(tmp_path, *common, name="straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")  # as if stopped after step 3
    second = run(tmp_path, *common, name="resumed")
    assert second["start_step"] == 3 and second["step"] == 6
    step_a, straight = final_params(tmp_path / "straight")
    step_b, resumed = final_params(tmp_path / "resumed")
    assert step_a == step_b == 6
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    resumed_losses = [r["loss"] for r in records(tmp_path / "resumed") if "loss" in r]
    straight_losses = [r["loss"] for r in records(tmp_path / "straight") if "loss" in r]
    assert resumed_losses == straight_losses and len(resumed_losses) == 6  # steps 4-6 replayed exactly, once


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    from recipes.train import build

    real = build.make_loss_fn

    def poisoned(graphdef):
        loss = real(graphdef)
        return lambda params, tokens: loss(params, tokens) * np.nan
    run(tmp_path, "--train.steps=2", name="good")  # a good checkpoint at step 2 to resume from
    _, before = final_params(tmp_path / "good")
    monkeypatch.setattr(build, "make_loss_fn", poisoned)
    with pytest.raises(train.NonFiniteError, match="3 consecutive non-finite steps"):
        run(tmp_path, "--train.steps=10", "--train.max_nonfinite_steps=3", name="good")
    step, after = final_params(tmp_path / "good")
    assert step == 2  # no checkpoint of the failed steps
    jax.tree.map(np.testing.assert_array_equal, before, after)
    summary = json.loads((tmp_path / "good" / "summary.json").read_text())
    assert summary["stopped_by"] == "nonfinite" and summary["trusted_step"] == 2 and not summary["finished"]


@pytest.mark.slow
def test_a_diverging_run_never_checkpoints_its_poisoned_state_and_resumes_from_a_trusted_one(tmp_path):
    """A huge lr: a finite loss spike poisons the parameters, NaNs follow; no checkpoint after the
    spike is written, so the good ones are never rotated out, and a saner rerun resumes from one."""
    args = ("--train.steps=40", "--train.checkpoint_every=4", "--train.keep_checkpoints=2",
            "--train.max_nonfinite_steps=3", "--optimizer.schedule.warmup_steps=0")
    run(tmp_path, *args, "--train.stop_at_step=8", name="d")  # healthy checkpoints at 4 and 8
    with pytest.raises(train.NonFiniteError, match="holds the last trusted state"):
        run(tmp_path, *args, "--optimizer.lr=1e6", name="d")
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["stopped_by"] == "nonfinite" and summary["trusted_step"] == 8
    step, params = final_params(tmp_path / "d")
    assert step == 8 and max(float(np.abs(x).max()) for x in jax.tree.leaves(params)) < 100
    resumed = run(tmp_path, *args, "--train.stop_at_step=12", name="d")
    assert resumed["start_step"] == 8 and resumed["step"] == 12 and np.isfinite(resumed["train_loss"])


def test_skipped_step_leaves_state_unchanged():
    import optax

    from recipes.train.step import make_train_step
    params = {"w": jax.numpy.ones((4, 4))}
    tx = optax.adamw(0.1)
    state = {"params": params, "opt_state": tx.init(params), "step": jax.numpy.zeros((), "int32")}
    shardings = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)

    def loss_fn(p, tokens):
        return jax.numpy.sum(p["w"]) * tokens.sum() / tokens.sum()
    step = make_train_step(loss_fn, tx, micro_batches=1, shardings=shardings, batch_sharding=None)
    tokens = jax.numpy.ones((2, 3), "int32")
    good, metrics = step(jax.tree.map(jax.numpy.copy, state), tokens)
    assert bool(metrics["finite"]) and not np.array_equal(good["params"]["w"], params["w"])
    bad_tokens = tokens.at[0, 0].set(0) * 0  # 0/0 -> NaN loss
    bad, metrics = step(jax.tree.map(jax.numpy.copy, state), bad_tokens)
    assert not bool(metrics["finite"]) and int(bad["step"]) == 1
    jax.tree.map(np.testing.assert_array_equal, bad["params"], state["params"])
    jax.tree.map(np.testing.assert_array_equal, bad["opt_state"], state["opt_state"])


def test_logged_learning_rate_is_read_from_the_optimizer_state():
    """The logged rate is the schedule at the optimizer's own update count: it stands still on
    a skipped step (the train step counter does not)."""
    from recipes.optim.config import OptimizerConfig, ScheduleConfig
    from recipes.optim.optimizers import build_optimizer, learning_rate_reader, learning_rate_schedules, update_count
    from recipes.train.step import make_train_step

    params = {"w": jax.numpy.ones((4, 4)), "b": jax.numpy.ones(4)}
    config = OptimizerConfig(name="adamw", lr=1.0,
                             schedule=ScheduleConfig(kind="linear", min_lr_ratio=0.0))  # lr(n) = 1 - n / 4
    schedules = learning_rate_schedules(config, total_steps=4)
    tx, _ = build_optimizer(config, params, schedules=schedules)
    state = {"params": params, "opt_state": tx.init(params), "step": jax.numpy.zeros((), "int32")}
    shardings = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)

    def loss_fn(p, tokens):
        return (jax.numpy.sum(p["w"]) + jax.numpy.sum(p["b"])) * tokens.sum() / tokens.sum()
    step = make_train_step(loss_fn, tx, micro_batches=1, shardings=shardings, batch_sharding=None,
                           learning_rate=learning_rate_reader(schedules["adamw"]))
    good, bad = jax.numpy.ones((2, 3), "int32"), jax.numpy.zeros((2, 3), "int32")  # bad: 0/0 -> NaN
    rates = []
    for tokens in (good, bad, good, good, good):
        state, metrics = step(state, tokens)
        rates.append(float(metrics["lr"]))
    assert int(state["step"]) == 5 and int(update_count(state["opt_state"])) == 4  # the bad step skipped
    np.testing.assert_allclose(rates, [1.0, 0.75, 0.75, 0.5, 0.25])


def test_dry_run_gpt2_small_and_gpt3_xl(capsys):
    report = train.main(["--config", "gpt2_small_celo2", "--dry-run", "--mesh.devices=8"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == report
    assert report["n_params"] == 124_439_808
    # The step is the recipe's global_batch x seq_len, as its YAML writes them: 512 x 1024, 0.5M tokens.
    tokens_per_step = recipe_setting("gpt2_small_celo2", "data", "global_batch") * recipe_setting(
        "gpt2_small_celo2", "data", "seq_len")
    assert report["tokens_per_step"] == tokens_per_step == 524_288
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["mesh_levels"] == {"granules": 1, "across": {"data": 1, "fsdp": 1, "tensor": 1},
                                     "inside": report["mesh"]}  # one process: nothing crosses a slow link
    # GPT-2 small in closed form: embeddings (vocabulary padded to 50,304, 1,024 positions), 12 blocks of
    # four matrices (12 d^2) and 13 d vectors (biases, two LayerNorms), the final LayerNorm.
    d, layers = 768, 12
    matrices, vectors = layers * 12 * d * d, layers * 13 * d + 2 * d
    n_padded = (50_304 + 1_024) * d + matrices + vectors
    assert report["n_params_padded"] == sum(report["n_params_by_branch"].values()) == n_padded
    per_device = report["bytes_per_device"]
    # fp32 parameters split 8 ways: no device holds less than its eighth, and only vectors (a replicated
    # bias costs at most its whole size) add to it.
    assert 4 * n_padded / 8 <= per_device["params"] <= 4 * n_padded / 8 + 4 * vectors
    # Celo2 keeps 4 arrays shaped like each hidden matrix (plus row and column statistics, 3 each per
    # matrix: 48 d a layer), AdamW 2 like each other parameter: those split 8 ways too.
    sharded_state = 4 * (4 * matrices + 2 * (n_padded - matrices)) / 8
    assert sharded_state <= per_device["opt_state"] <= sharded_state + 4 * (layers * 48 * d + 2 * vectors) + 64
    assert per_device["params_and_opt_state"] == per_device["params"] + per_device["opt_state"] + 4  # the int32 step

    report = train.main(["--config", "gpt3xl_adamw", "--dry-run"])
    assert 1.3e9 < report["n_params"] < 1.4e9
    assert report["tokens_per_step"] == recipe_setting("gpt3xl_adamw", "data", "global_batch") * recipe_setting(
        "gpt3xl_adamw", "data", "seq_len") == 512 * 2048


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "celo2"])
def test_track3_recipes_have_the_published_sizes(optimizer):
    """modded-nanogpt's optimization track: GPT-2 small, 50,304 vocabulary rows, 524,288 tokens
    per step of 1,024, 10,485,760 validation tokens, target 3.28."""
    import model
    from recipes.train import config as config_lib

    report = train.main(["--config", f"gpt2_small_track3_{optimizer}", "--dry-run"])
    config = config_lib.load_config(f"gpt2_small_track3_{optimizer}")
    assert report["n_params"] == 124_439_808 and config.model.padded_vocab_size == 50_304
    assert report["tokens_per_step"] == 524_288 and config.data.seq_len == 1024
    assert config.eval.batches * config.eval.batch_size * config.data.seq_len == 10_485_760
    assert config.train.target_val_loss == 3.28
    assert model.count_params(config.model).padded_total == report["n_params_padded"]


def test_bad_config_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'optimizer.lr'"):
        run(tmp_path, "--optimizer.lrate=1")
    with pytest.raises(ValueError, match="do not split over the 8 batch shards"):
        run(tmp_path, "--mesh.devices=8", "--data.global_batch=12")


@pytest.mark.slow
def test_run_ends_with_a_readable_summary_and_a_sample(tmp_path, capsys):
    run(tmp_path, "--train.steps=3", "--sample.max_new_tokens=5", "--sample.prompt=**ROMEO**\n")
    out = capsys.readouterr().out
    lines = out.splitlines()
    json_line = next(i for i, line in enumerate(lines) if line.startswith('{"start_step"'))
    assert json.loads(lines[json_line])["finished"]  # scripts still read the JSON line
    tail = "\n".join(lines[json_line + 1:])
    assert "run finished: 3 steps (768 tokens)" in tail and "validation loss" in tail and " -> " in tail
    assert f"scripts/sample.py --checkpoint {tmp_path / 'run'} --prompt $'**ROMEO**\\n'" in tail
    assert "scripts/export_hf.py --checkpoint" in tail
    assert "--- a sample (5 new tokens, temperature 0.8) ---\n**ROMEO**\n" in tail


def test_without_config_the_default_recipe_trains(tmp_path):
    """`train.py` alone plans exactly the run `train.py --config shakespeare_celo2.yaml` plans: the
    dry-run reports of two real processes (their last stdout line) are equal."""
    commands = {"default": ["train.py", "--dry-run"],
                "named": ["train.py", "--config", "shakespeare_celo2.yaml", "--dry-run"]}
    done = run_at_once(commands, tmp_path)
    reports = {}
    for key, result in done.items():
        assert result.returncode == 0, result.stderr[-3000:]
        reports[key] = json.loads(result.stdout.strip().splitlines()[-1])
    assert reports["default"] == reports["named"]
    assert reports["default"]["tokens_per_step"] == recipe_setting("shakespeare_celo2", "data", "global_batch") * \
        recipe_setting("shakespeare_celo2", "data", "seq_len")  # the report is the recipe's, not some default


@pytest.mark.slow
def test_replayed_steps_are_logged_once_and_a_finished_run_keeps_its_summary(tmp_path, capsys):
    import shutil

    args = ("--train.steps=4", "--train.checkpoint_every=2", "--train.keep_checkpoints=3")
    run(tmp_path, *args)
    run_dir = tmp_path / "run"
    shutil.rmtree(run_dir / "checkpoints" / "4")  # as if killed after logging steps 3-4 but before saving
    resumed = run(tmp_path, *args)
    assert resumed["start_step"] == 2 and resumed["finished"]
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # 3 and 4 replayed, each logged once
    before = (run_dir / "summary.json").read_text()
    capsys.readouterr()
    again = run(tmp_path, *args)
    assert "nothing to train" in capsys.readouterr().out
    assert (run_dir / "summary.json").read_text() == before and again["val_loss"] is not None


@pytest.mark.slow
def test_an_update_that_blows_up_the_parameters_is_not_checkpointed(tmp_path, monkeypatch):
    """The loss of step s is measured before update s; a checkpoint of step s is judged by the
    updated parameters' own loss, so a finite blow-up in the very last update is caught too."""
    args = ("--train.steps=12", "--train.checkpoint_every=4", "--train.keep_checkpoints=3",
            "--optimizer.schedule.warmup_steps=0")
    run(tmp_path, *args, "--train.stop_at_step=4", name="b")
    summary = run(tmp_path, *args, "--train.stop_at_step=5", "--optimizer.lr=1e4", "--train.max_nonfinite_steps=100",
                  name="b")
    assert summary["trusted_step"] == 4
    assert final_params(tmp_path / "b")[0] == 4  # step 5's blown-up state was not saved


@pytest.mark.slow
def test_a_rerun_with_another_layout_is_refused_before_the_run_directory_changes(tmp_path, capsys):
    run(tmp_path, "--train.steps=2", name="r")
    run_dir = tmp_path / "r"
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "routing.json", "summary.json")}
    with pytest.raises(ConfigError, match=r"another model or optimizer layout \(model.d_model 64 -> 128\)"):
        run(tmp_path, "--train.steps=2", "--model.d_model=128", name="r")
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    capsys.readouterr()
    resumed = run(tmp_path, "--train.steps=3", "--optimizer.lr=1e-3", name="r")  # a layout-preserving change
    assert resumed["start_step"] == 2 and resumed["step"] == 3
    assert "resuming" in capsys.readouterr().out
    assert (run_dir / "config_history" / "config.1.yaml").read_bytes() == before["config.yaml"]  # kept, not lost
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()


def _garble_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").write_text("{not json")


# Truncated and deleted arrays are met by real processes in test_train_faults.py.
@pytest.mark.slow
def test_resume_falls_back_past_a_damaged_checkpoint_and_keeps_it_aside(tmp_path, capsys):
    args = ("--train.steps=4", "--train.checkpoint_every=2", "--train.keep_checkpoints=3")
    run(tmp_path, *args, "--train.stop_at_step=4", name="f")
    checkpoints = tmp_path / "f" / "checkpoints"
    _garble_metadata(checkpoints / "4")
    capsys.readouterr()
    resumed = run(tmp_path, *args, "--train.steps=6", name="f")
    out = capsys.readouterr().out
    assert "checkpoint 4 does not restore" in out and resumed["start_step"] == 2 and resumed["finished"]
    assert (tmp_path / "f" / "checkpoints.damaged" / "4").is_dir()  # kept for inspection, not deleted


def test_a_checkpoint_holding_the_former_rng_entry_still_restores(tmp_path):
    from recipes.train.checkpoint import Checkpointer

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = {"params": {"w": jax.numpy.arange(4.0)}, "opt_state": (jax.numpy.ones(2),),
             "step": jax.numpy.array(3, "int32")}
    writer = Checkpointer(tmp_path / "checkpoints")
    writer.save(3, {**state, "rng": jax.numpy.zeros((2,), "uint32")}, {"step": 3})  # as runs wrote it before
    writer.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
    reader = Checkpointer(tmp_path / "checkpoints")
    step, restored = reader.restore_newest(abstract)
    reader.close()
    assert step == 3 and set(restored) == {"params", "opt_state", "step"}
    jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_a_second_trainer_into_the_same_run_directory_is_refused(tmp_path):
    from recipes.train.run_dir import RunDirLock

    (tmp_path / "l").mkdir()
    holder = RunDirLock(tmp_path / "l")
    holder.acquire()  # as another live trainer would hold it
    try:
        with pytest.raises(ConfigError, match=r"is in use by pid \d+"):
            run(tmp_path, "--train.steps=2", name="l")
        assert not (tmp_path / "l" / "metrics.jsonl").exists()
    finally:
        holder.release()
    assert run(tmp_path, "--train.steps=2", name="l")["finished"]  # released: trains
    assert run(tmp_path, "--train.steps=3", name="l")["step"] == 3  # and its own lock was released too


@pytest.mark.slow
def test_steps_to_target_are_recorded_and_stop_the_run_when_asked(tmp_path):
    """The first evaluation at or below train.target_val_loss is recorded; stop_at_target ends there,
    and a rerun finds the target already reached."""
    plain = run(tmp_path, "--train.steps=12", "--eval.every=3", name="plain")
    vals = [r for r in records(tmp_path / "plain") if "val_loss" in r]
    target = (vals[1]["val_loss"] + vals[2]["val_loss"]) / 2  # reached at step 6, not at 3
    assert plain.get("target_step") is None
    summary = run(tmp_path, "--train.steps=12", "--eval.every=3", f"--train.target_val_loss={target}",
                  "--train.stop_at_target=true", "--train.checkpoint_every=100", name="target")
    assert summary["target_step"] == 6 and summary["step"] == 6 and summary["finished"] is True
    assert summary["target_tokens"] == 6 * 8 * 32 and summary["target_wall_time_s"] > 0
    saved = json.loads((tmp_path / "target" / "summary.json").read_text())
    assert saved["target_step"] == 6 and saved["ended_at_target"] is True
    (row,) = [r for r in records(tmp_path / "target") if "target_step" in r]
    assert row["target_val_loss"] == pytest.approx(target) and row["step"] == 6
    assert final_params(tmp_path / "target")[0] == 6  # a checkpoint where it stopped
    again = run(tmp_path, "--train.steps=12", "--eval.every=3", f"--train.target_val_loss={target}",
                "--train.stop_at_target=true", name="target")
    assert again["target_step"] == 6 and final_params(tmp_path / "target")[0] == 6
    other = run(tmp_path, "--train.steps=12", "--eval.every=3", "--train.target_val_loss=0.5", name="target")
    assert other["target_step"] is None and other["step"] == 12  # another target is not the one reached
