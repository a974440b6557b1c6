"""Two jax.distributed processes on localhost (4 CPU devices each), started as a Slurm step starts
them, with no distributed flag: they train on a two-level mesh like one process with 8 devices.
Each process feeds only its half of every global batch."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import train
from tests.helpers import ROOT, SHARDED_RTOL, TINY, final_params, one_error_line

WORKER = """
import sys
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 4)
sys.path.insert(0, {root!r})
import train
summary = train.main(sys.argv[1:])
print("SUMMARY", jax.process_index(), jax.process_count(), jax.device_count())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_task_env(task: int, tasks: int, port: int) -> dict:
    """What srun sets in each task of a one-node, ``tasks``-task step (and the coordinator port)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
            "JAX_COORDINATOR_PORT": str(port)}


def test_a_slurm_step_starts_with_no_flag_on_a_two_level_mesh_and_resumes_on_one_process(tmp_path):
    # A warmup longer than the run prints a note before anything else: before the distributed start.
    common = [*TINY, "--train.steps=4", "--train.checkpoint_every=2", "--eval.at_start=false",
              "--optimizer.schedule.warmup_steps=10"]
    common.remove("--mesh.devices=1")
    port = free_port()
    worker = WORKER.format(root=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", worker, *common, "--train.stop_at_step=2",
                               f"--train.out_dir={tmp_path / 'two'}"], cwd=ROOT, env=slurm_task_env(i, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-4000:]
    assert "SUMMARY 0 2 8" in outs[0] and "SUMMARY 1 2 8" in outs[1] and "note: " in outs[0]
    # Data parallel across the two processes, FSDP over each one's four devices.
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1} = across 2 hosts {data: 2} x inside each {fsdp: 4}" in outs[0]

    resumed = train.main([*common, f"--train.out_dir={tmp_path / 'two'}"])  # one process, 8 devices
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    straight = train.main([*common, f"--train.out_dir={tmp_path / 'one'}"])
    _, params = final_params(tmp_path / "two")
    _, straight_params = final_params(tmp_path / "one")
    # AdamW divides each gradient by its own scale, so the rounding of a sharded sum moves weights
    # whose gradient is near zero by up to ~1e-6 (observed 2e-6) against weights of ~5e-3.
    for leaf, straight_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(straight_params)):
        np.testing.assert_allclose(leaf, straight_leaf, rtol=SHARDED_RTOL, atol=1e-5)
    np.testing.assert_allclose(resumed["val_loss"], straight["val_loss"], rtol=SHARDED_RTOL)


def test_a_coordinator_that_does_not_answer_is_one_line(tmp_path):
    port = free_port()  # nothing listens there: process 0 never started
    done = subprocess.run([sys.executable, "train.py", *TINY, "--train.steps=2", "--mesh.connect_timeout_s=5",
                           "--mesh.distributed=true", f"--mesh.coordinator_address=127.0.0.1:{port}",
                           "--mesh.num_processes=2", "--mesh.process_id=1", f"--train.out_dir={tmp_path / 'run'}"],
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert one_error_line(done) == (f"error: the coordinator 127.0.0.1:{port} did not answer within 5 s "
                                    "(Connection refused): start process 0 (it hosts the coordinator), check the "
                                    "address and that its port is open, or raise mesh.connect_timeout_s")
    assert not (tmp_path / "run").exists()
