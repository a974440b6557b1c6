"""Faults met by real scripts/metatrain.py processes: a signal, a second process on the directory,
damaged and deleted checkpoint files, bad settings. Each ends in its documented exit code, with one
`error:` line where it fails, and the run then resumes to the same theta as an undisturbed one; what
the abandoned steps wrote (snapshots, their scores) is set aside, not mixed with the new timeline."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from recipes.optim.theta import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "metatrain": {"outer_steps": 6, "init_theta": "normalized_momentum", "outer_lr": 1e-2, "profile": False,
                  "snapshot_every": 0, "checkpoint_every_s": 0, "log_every": 1},
    "pes": {"particles": 2, "truncation": 2, "min_length": 2, "max_length": 4},
    "inner": {"scale_min": 0.5, "scale_max": 2.0},
    "families": [{"kind": "image_mlp", "hidden": [], "batch": 8}],
}


def start(tmp_path: Path, out_dir: Path, *extra: str) -> subprocess.Popen:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "metatrain": {**TINY["metatrain"], "out_dir": str(out_dir)}}))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("CELO2_DEBUG", None)
    cache = f"--compilation-cache={tmp_path / 'jax_cache'}"  # later processes skip compiling
    return subprocess.Popen([sys.executable, "scripts/metatrain.py", "--config", str(config), "--cpu-devices=1", cache,
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def theta_leaves(path: Path):
    return [np.asarray(x) for x in __import__("jax").tree.leaves(load_checkpoint(path))]


def saved_steps(run: Path) -> list[int]:
    """Steps of the finished orbax checkpoints (one being written has a temporary name)."""
    folder = run / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def test_signal_lock_damage_and_bad_settings(tmp_path):
    run = tmp_path / "run"
    first = start(tmp_path, run, "--metatrain.outer_steps=100000", "--metatrain.snapshot_every=1")
    try:
        deadline = time.time() + 300
        while len(saved_steps(run)) < 2:  # two checkpoints written
            if first.poll() is not None or time.time() > deadline:
                first.kill()
                pytest.fail(f"no second checkpoint: {first.communicate()[1][-3000:]}")
            time.sleep(0.5)

        second = start(tmp_path, run)  # a second process on a live run directory is refused
        code, _, err = finish(second)
        assert code == 1 and f"is in use by pid {first.pid}" in one_error_line(err)

        # SIGTERM, then again every 20 ms until it exits (one stop can bring several): it saves once,
        # and its exit stays 143.
        ended = {}
        reader = threading.Thread(target=lambda: ended.update(zip(("code", "out", "err"), finish(first))))
        reader.start()
        while reader.is_alive():
            if first.returncode is None:
                first.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        code, out, err = ended["code"], ended["out"], ended["err"]
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    stopped_at = saved_steps(run)[-1]
    assert f"stopped by SIGTERM at outer step {stopped_at}; checkpoint saved" in out
    before = saved_steps(run)[-2]
    end = stopped_at + 1

    # The newest checkpoint's arrays cut short: resume falls back to the one before, keeps the damaged
    # one aside, and reaches the same theta as a run never stopped.
    for f in (run / "checkpoints" / str(stopped_at) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    abandoned = {f"theta_{s:07d}.state": (run / "thetas" / f"theta_{s:07d}.state").read_bytes()
                 for s in range(before + 1, stopped_at + 1)}
    scores = {"task": "validation/300x3", "snapshots": {str(s): {"mean": float(s)} for s in (0, before, stopped_at)}}
    (run / "validation.json").write_text(json.dumps(scores))
    code, out, err = finish(start(tmp_path, run, f"--metatrain.outer_steps={end}", "--metatrain.snapshot_every=1"))
    assert code == 0, err[-3000:]
    assert f"checkpoint {stopped_at} does not restore" in out and f"at outer step {before}" in out
    assert list((run / "checkpoints.damaged").iterdir())
    # The snapshots and scores of steps past the checkpoint resumed from are set aside, whole.
    assert sorted(p.name for p in (run / "thetas").iterdir()) == [f"theta_{s:07d}.state" for s in range(1, end + 1)]
    assert {p.name: p.read_bytes() for p in (run / "thetas.set_aside").iterdir()} == abandoned
    assert sorted(json.loads((run / "validation.json").read_text())["snapshots"]) == sorted(["0", str(before)])
    aside = [json.loads(line) for line in (run / "validation.set_aside.jsonl").read_text().splitlines()]
    assert aside == [{"outer_step": stopped_at, "task": "validation/300x3", "score": {"mean": float(stopped_at)}}]
    undisturbed = tmp_path / "undisturbed"
    code, _, err = finish(start(tmp_path, undisturbed, f"--metatrain.outer_steps={end}"))
    assert code == 0, err[-3000:]
    for a, b in zip(theta_leaves(run / "theta.state"), theta_leaves(undisturbed / "theta.state")):
        np.testing.assert_array_equal(a, b)

    # Deleted arrays: the previous checkpoint carries the run on.
    newest, previous = saved_steps(run)[-1], saved_steps(run)[-2]
    shutil.rmtree(run / "checkpoints" / str(newest) / "state")
    code, out, err = finish(start(tmp_path, run, f"--metatrain.outer_steps={end + 1}"))
    assert code == 0 and f"resumed {run} at outer step {previous}" in out, err[-3000:]
    assert f"done: outer step {end + 1}" in out

    # Settings that change the problem, and a misspelt key: one line each, the directory untouched.
    code, _, err = finish(start(tmp_path, run, f"--metatrain.outer_steps={end + 2}", "--pes.particles=4"))
    assert code == 1 and "different ['pes'] settings" in one_error_line(err)
    code, _, err = finish(start(tmp_path, run, "--pes.partciles=4"))
    assert code == 1 and "pes.partciles" in one_error_line(err)
    assert not (run / ".lock").read_text().strip()  # every process above released the lock
