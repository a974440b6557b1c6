"""Which launchers start the multi-host runtime by themselves, read from the variables each one sets
(the two-process start itself runs in test_distributed.py)."""
from pathlib import Path

import pytest

from recipes.train.cluster import CLUSTERS, detected_cluster, first_slurm_host, node_gpus, slurm_settings

LAUNCHED = {
    "Slurm": {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "2",
              "SLURM_PROCID": "1", "SLURM_LOCALID": "0"},
    "Open MPI": {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4"},
    "a TPU pod": {"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"},
    "a Kubernetes indexed job": {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"},
}
# Set by the same launchers for a job of one process, which stays one process.
ALONE = {
    "sbatch's own shell": {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"},
    "a one-task srun step": {**LAUNCHED["Slurm"], "SLURM_NTASKS": "1"},
    "mpirun -n 1": {**LAUNCHED["Open MPI"], "OMPI_COMM_WORLD_SIZE": "1"},
    "a one-host TPU VM": {"TPU_WORKER_HOSTNAMES": "localhost"},
}


@pytest.fixture
def bare_env(monkeypatch):
    for variables in LAUNCHED.values():
        for name in variables:
            monkeypatch.delenv(name, raising=False)
    for name in ("MEGASCALE_COORDINATOR_ADDRESS", "CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_PORT",
                 "SLURM_STEP_TASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("cluster", list(LAUNCHED))
def test_each_launcher_is_detected(bare_env, cluster):
    assert set(CLUSTERS) == set(LAUNCHED)
    for name, value in LAUNCHED[cluster].items():
        bare_env.setenv(name, value)
    assert detected_cluster() == cluster


@pytest.mark.parametrize("case", list(ALONE))
def test_a_job_of_one_process_stays_one_process(bare_env, case):
    assert detected_cluster() is None
    for name, value in ALONE[case].items():
        bare_env.setenv(name, value)
    assert detected_cluster() is None


@pytest.mark.parametrize("node_list, first", [("node001", "node001"), ("node001,host2", "node001"),
                                              ("gpu[007-012,020],cpu1", "gpu007"), ("a[1,3],b", "a1")])
def test_the_first_host_of_a_slurm_node_list(node_list, first):
    assert first_slurm_host(node_list) == first


def test_a_slurm_task_meets_on_its_first_node_with_every_gpu_it_was_given(bare_env):
    for name, value in LAUNCHED["Slurm"].items():
        bare_env.setenv(name, value)
    bare_env.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert slurm_settings() == {"coordinator_address": f"gpu003:{61440 + 77}", "num_processes": 2,
                                "process_id": 1, "local_device_ids": [0, 1, 2, 3]}
    bare_env.setenv("JAX_COORDINATOR_PORT", "9999")
    assert slurm_settings()["coordinator_address"] == "gpu003:9999"


def test_the_one_process_of_a_node_keeps_every_gpu_even_without_cuda_visible_devices(bare_env, tmp_path):
    for name, value in LAUNCHED["Open MPI"].items():
        bare_env.setenv(name, value)
    bare_env.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
    assert node_gpus() == ({"local_device_ids": list(range(len(list(Path("/proc/driver/nvidia/gpus").glob("*")))))}
                           if Path("/proc/driver/nvidia/gpus").is_dir() else {})  # the driver's list, where it has one
    bare_env.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8")  # a process per GPU: JAX's one each stands
    assert node_gpus() == {}
    bare_env.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert node_gpus() == {"local_device_ids": [0, 1]}
