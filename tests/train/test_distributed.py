"""Two jax.distributed processes on localhost (2 CPU devices each) train like one process
with 4 devices. Each process feeds only its half of every global batch."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

import train
from tests.helpers import ROOT, SHARDED_RTOL, TINY, train_losses

WORKER = """
import sys
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
sys.path.insert(0, {root!r})
import train
summary = train.main(sys.argv[1:])
print("SUMMARY", jax.process_index(), jax.process_count(), jax.device_count())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    common = [*TINY, "--train.steps=3", "--eval.at_start=false", "--mesh.data=2", "--mesh.fsdp=-1"]
    common.remove("--mesh.devices=1")
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER.format(root=str(ROOT)), *common, f"--train.out_dir={tmp_path / 'two'}",
             "--mesh.distributed=true", f"--mesh.coordinator_address=127.0.0.1:{port}",
             "--mesh.num_processes=2", f"--mesh.process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-4000:]
    assert "SUMMARY 0 2 4" in outs[0] and "SUMMARY 1 2 4" in outs[1]
    summary = json.loads([line for line in outs[0].splitlines() if line.startswith("{")][-1])

    one = train.main([*common, "--mesh.devices=4", f"--train.out_dir={tmp_path / 'one'}"])
    np.testing.assert_allclose(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"), rtol=SHARDED_RTOL)
    np.testing.assert_allclose(summary["val_loss"], one["val_loss"], rtol=SHARDED_RTOL)
