"""What a run directory and train.py guarantee, each driven through a real train.py process: nothing
the user owns is erased, every failure is one `error:` line, and the exit code tells a scheduler
whether work remains."""
import json
import os
import resource
import signal
import subprocess
import sys

import jax
import numpy as np
from flax import serialization

from recipes.optim.theta import _wrap, normalized_momentum_theta
from tests.helpers import ROOT, TINY, final_params, one_error_line, process_env, train_process


def rows(run_dir, name="metrics.jsonl"):
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_lost_config_yaml_never_turns_a_run_into_a_new_one(tmp_path):
    run_dir = tmp_path / "run"
    assert train_process(run_dir, "--train.stop_at_step=8").returncode == 0
    (run_dir / "config.yaml").unlink()
    metrics = (run_dir / "metrics.jsonl").read_bytes()

    changed = train_process(run_dir, "--model.d_model=128")
    assert changed.returncode == 1
    assert "another model or optimizer layout (model.d_model 64 -> 128)" in one_error_line(changed)
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics and final_params(run_dir)[0] == 8
    assert not (run_dir / "checkpoints.damaged").exists()

    resumed = train_process(run_dir, "--train.stop_at_step=12")
    assert resumed.returncode == 0 and f"resumed {run_dir} at step 8" in resumed.stdout


def test_a_config_yaml_of_random_bytes_resumes_from_the_checkpoints_own_settings(tmp_path):
    run_dir = tmp_path / "run"
    assert train_process(run_dir, "--train.stop_at_step=4").returncode == 0
    garbage = os.urandom(300)
    (run_dir / "config.yaml").write_bytes(garbage)
    resumed = train_process(run_dir, "--train.stop_at_step=8")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {run_dir} at step 4" in resumed.stdout
    kept = [p.read_bytes() for p in (run_dir / "config_history").iterdir()]
    assert garbage in kept  # the user's bytes are kept, not overwritten


def test_a_directory_of_files_no_trainer_wrote_is_refused_untouched(tmp_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "metrics.jsonl").write_text('{"step": 1, "accuracy": 0.9}\n')
    (users / "summary.json").write_text('{"mine": true}\n')
    refused = train_process(users)
    assert refused.returncode == 1
    line = one_error_line(refused)
    assert "holds files a trainer did not write (metrics.jsonl, summary.json)" in line
    assert (users / "metrics.jsonl").read_text() == '{"step": 1, "accuracy": 0.9}\n'
    assert sorted(p.name for p in users.iterdir()) == ["metrics.jsonl", "summary.json"]

    (tmp_path / "a_file").write_text("keep me")
    refused = train_process(tmp_path / "a_file")
    assert "is a file, not a directory" in one_error_line(refused)
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_an_interpolation_in_a_recipe_is_refused_and_never_written_out(tmp_path):
    recipe = tmp_path / "secret.yaml"
    recipe.write_text("base: shakespeare_celo2.yaml\nlogging:\n  wandb_project: ${oc.env:CELO2_TEST_TOKEN}\n")
    env = {**process_env(), "CELO2_TEST_TOKEN": "s3cr3t-value"}
    done = subprocess.run([sys.executable, "train.py", "--config", str(recipe), f"--train.out_dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and "logging.wandb_project is an interpolation" in one_error_line(done)
    assert "s3cr3t-value" not in done.stderr + done.stdout and not (tmp_path / "run").exists()


def test_a_sigterm_in_the_last_step_still_exits_0_and_so_does_every_rerun(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "--train.steps=1", "--eval.at_start=true", f"--train.out_dir={run_dir}"]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=process_env())
    for line in process.stdout:  # the first evaluation runs after the stop handler is in place
        if "step 0: val loss" in line:
            process.send_signal(signal.SIGTERM)  # arrives while step 1, the last, compiles
            break
    process.communicate(timeout=300)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["stopped_by"] == "SIGTERM" and summary["step"] == 1
    assert process.returncode == 0
    rerun = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                           env=process_env(), timeout=300)
    assert rerun.returncode == 0 and "nothing to train" in rerun.stdout


def test_a_theta_of_nan_weights_is_refused_before_training(tmp_path):
    weights = normalized_momentum_theta()["ff_mod_stack"]["~"]
    poisoned = {name: np.array(value, np.float32) for name, value in weights.items()}
    first = sorted(poisoned)[0]
    poisoned[first].flat[0] = np.nan
    path = tmp_path / "nan_theta.state"
    path.write_bytes(serialization.msgpack_serialize(_wrap(poisoned)))
    done = train_process(tmp_path / "run", "--optimizer.name=celo2", f"--optimizer.theta={path}")
    assert done.returncode == 1
    assert f"key '{first}' holds 1 non-finite value(s)" in one_error_line(done)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failed_checkpoint_write_is_one_line_and_the_previous_checkpoint_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    assert train_process(straight, "--train.stop_at_step=8").returncode == 0
    run_dir = tmp_path / "run"
    assert train_process(run_dir, "--train.stop_at_step=4").returncode == 0

    def limit_file_size():  # 1 MB per file: metrics and configs fit, the checkpoint's arrays do not
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    env = process_env()
    env.pop("JAX_COMPILATION_CACHE_DIR")  # cache entries could hit the limit too
    args = [*TINY, "--train.steps=40", "--train.checkpoint_every=4", "--train.keep_checkpoints=2",
            "--optimizer.schedule.warmup_steps=0", "--eval.at_start=false", f"--train.out_dir={run_dir}",
            "--train.stop_at_step=8"]
    failed = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=600, preexec_fn=limit_file_size)
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr.split(errors[0])[-1]
    assert "could not write the checkpoint of step 8" in errors[0] and "File too large" in errors[0]
    assert "the checkpoint of step 4 is intact and a rerun resumes from it" in errors[0]

    resumed = train_process(run_dir, "--train.stop_at_step=8")
    assert resumed.returncode == 0 and f"resumed {run_dir} at step 4" in resumed.stdout
    step, params = final_params(run_dir)
    straight_step, straight_params = final_params(straight)
    assert step == straight_step == 8
    for resumed_leaf, straight_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(straight_params)):
        np.testing.assert_array_equal(resumed_leaf, straight_leaf)  # the resume is exact


def test_a_kill_before_the_first_checkpoint_leaves_one_step_0_row(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "--train.steps=4", "--eval.at_start=true", f"--train.out_dir={run_dir}"]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=process_env())
    for line in process.stdout:
        if "step 0: val loss" in line:
            process.kill()
            break
    process.wait(timeout=60)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    killed_rows = rows(run_dir)
    assert train_process(run_dir, "--train.steps=4", "--eval.at_start=true").returncode == 0
    assert [r["step"] for r in rows(run_dir) if "val_loss" in r].count(0) == 1
    assert rows(run_dir, "metrics.set_aside.jsonl") == killed_rows  # set aside, never deleted


def test_a_batch_larger_than_the_data_is_one_line(tmp_path):
    done = train_process(tmp_path / "run", "--data.global_batch=100000", "--data.micro_batch=16")
    assert done.returncode == 1
    assert "global_batch 100000 is larger than the data" in one_error_line(done)


def test_a_non_finite_update_is_skipped_like_a_non_finite_loss():
    """A finite loss and gradient can still give a NaN update (a broken theta, an overflow): the
    parameters and optimizer state must stay as they were."""
    import jax.numpy as jnp
    import optax

    from model import make_mesh
    from recipes.train import config as config_lib
    from recipes.train.build import build_program
    from recipes.train.step import make_train_step

    config = config_lib.load_config("shakespeare_celo2", ["--model.size=tiny", "--model.vocab_size=512",
                                                          "--data.seq_len=16", "--data.global_batch=4",
                                                          "--optimizer.name=adamw"])
    program = build_program(config, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    def nan_update(grads, opt_state, params=None):  # NaN updates whatever the gradient; same state
        updates, opt_state = program.tx.update(grads, opt_state, params)
        return jax.tree.map(lambda u: u * jnp.nan, updates), opt_state

    poisoned = optax.GradientTransformation(program.tx.init, nan_update)
    step = make_train_step(program.loss_fn, poisoned, micro_batches=1, shardings=program.shardings,
                           batch_sharding=program.batch_sharding)
    state = program.init_state()
    before = jax.tree.map(np.asarray, state)
    tokens = jax.device_put(np.random.default_rng(0).integers(0, 512, (4, 17), dtype=np.int32), program.batch_sharding)
    with jax.set_mesh(program.mesh):
        state, metrics = step(state, tokens)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"])
    for kept, original in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(np.asarray(kept), original)


def test_only_orphaned_checkpoint_reads_are_kept_off_stderr(caplog):
    """After a failed restore, asyncio's 'exception was never retrieved' records of tensorstore reads are
    dropped; any other unretrieved error is still logged."""
    import asyncio
    import gc

    from recipes.train.checkpoint import drop_orphaned_read_errors

    drop_orphaned_read_errors()

    async def fail(error):
        raise error

    async def orphan(*errors):
        tasks = [asyncio.ensure_future(fail(e)) for e in errors]
        await asyncio.sleep(0)
        del tasks  # done, their exceptions never retrieved

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(orphan(ValueError('OUT_OF_RANGE: Error reading "opt_state.00031/.zarray"'),
                           RuntimeError("a bug elsewhere")))
        gc.collect()
    logged = [str(r.exc_info[1]) for r in caplog.records if "never retrieved" in r.getMessage()]
    assert logged == ["a bug elsewhere"]
