"""The ahead-of-time compile check: real TPU and GPU compiles on this CPU, through their runtimes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.experiments.hlo_collectives import collectives, level, replica_groups
from recipes.experiments.hlo_roofline import project
from recipes.experiments.gpu_slices import parse_topology
from recipes.experiments.tpu_slices import parse_slice

ROOT = Path(__file__).resolve().parents[2]
# d_model 128: TPU arrays are stored in tiles 128 wide, so a 64-wide model's arrays would be half padding.
TINY = ["--model.size=tiny", "--model.d_model=128", "--model.vocab_size=512", "--data.seq_len=32", "--data.global_batch=16"]


@pytest.mark.parametrize("name, chips, topology", [
    ("v5e-8", 8, "v5e:2x4"), ("v5e-4", 4, "v5e:2x2"), ("v6e-16", 16, "v6e:4x4"),
    ("v5p-8", 4, "v5p:2x2x1"), ("v5p-32", 16, "v5p:2x2x4"), ("v4-8", 4, "v4:2x2x1"),
    ("v5e-64", 64, "v5e:8x8"), ("v5p-64", 32, "v5p:2x4x4")])
def test_slices_are_named_as_cloud_tpu_names_them(name, chips, topology):
    s = parse_slice(name)
    assert (s.chips, s.topology_name) == (chips, topology)


@pytest.mark.parametrize("name", ["v5e-3", "v5p-9", "v7x-8", "h100-8", "v5e"])
def test_unknown_slices_are_refused_with_the_offered_ones(name):
    with pytest.raises(ValueError, match="v5e-8|offered"):
        parse_slice(name)


HLO = """HloModule step

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8] get-tuple-element(%p), index=1
  %g = f32[32]{0:T(256)} all-gather(%x), dimensions={0}
  %s = (f32[8], f32[32]) all-gather-start(%x), dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %r = bf16[4,4]{1,0} all-reduce(%a), to_apply=%add
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body
  ROOT %o = f32[8] reduce-scatter(%a), dimensions={0}
}
"""


def test_collectives_in_a_loop_count_once_per_iteration():
    c = collectives(HLO)
    assert c["uncounted_loops"] == []
    assert c["per_step"]["all-gather"] == {"count": 24, "bytes": 12 * (32 * 4 + 32 * 4)}  # two per iteration
    assert c["per_step"]["all-reduce"] == {"count": 1, "bytes": 32}
    assert c["per_step"]["reduce-scatter"] == {"count": 1, "bytes": 32}


def test_several_slices_are_for_tpus_only():
    assert parse_topology("v5e-8", 2).label == "2xv5e-8"
    with pytest.raises(ValueError, match="is for TPU slices"):
        parse_topology("h100-8", 2)
    with pytest.raises(ValueError, match="1 or more"):
        parse_topology("v5e-8", 0)


# Two slices of 4 devices: partitions 0-3 in slice 0, 4-7 in slice 1.
LEVELS_HLO = """HloModule step, num_partitions=8

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %r = f32[8] all-reduce(%a), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %x = f32[8] all-reduce(%a), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%add
  %g = f32[32] all-gather(%a), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %p = f32[8] collective-permute(%a), channel_id=4, source_target_pairs={{0,4},{4,0}}
  %t = token[] after-all()
  %v = (f32[16]{0:T(128)}, u32[], token[]) recv(%t), channel_id=5, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  %s = (f32[16]{0:T(128)}, u32[], token[]) send(%a, %t), channel_id=6, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %o = f32[8] add(%r, %x)
}
"""
SLICE_OF = [0, 0, 0, 0, 1, 1, 1, 1]


def test_replica_groups_read_explicit_iota_and_transposed_iota():
    assert replica_groups("replica_groups={{0,1},{2,3}}, dimensions={0}") == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,4]<=[8], x") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), x") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("source_target_pairs={{0,1},{1,0}}") == [[0, 1], [1, 0]]
    assert replica_groups("replica_groups={}, to_apply=%add") == []
    assert level("replica_groups={}", SLICE_OF) == "dcn" and level("replica_groups={}", [0] * 8) == "ici"


def test_collectives_split_by_the_links_they_cross():
    c = collectives(LEVELS_HLO, SLICE_OF)
    # Inside a slice: the {0-3},{4-7} all-reduce and the [2,4]<=[8] all-gather. Across: the transposed
    # iota's {0,4}..{3,7}, the permute 0<->4, and the multi-slice runtime's all-reduce (counted once,
    # at its receiving end).
    assert c["by_level"]["all-reduce"] == {"ici": 32, "dcn": 32 + 64}
    assert c["by_level"]["all-gather"] == {"ici": 128, "dcn": 0}
    assert c["by_level"]["collective-permute"] == {"ici": 0, "dcn": 32}
    assert c["level_totals"] == {"ici": 160, "dcn": 128}
    assert c["per_step"]["all-reduce"] == {"count": 3, "bytes": 128}
    # A program of one slice's devices (as TPU multi-slice programs are): only the runtime's transfers cross.
    assert collectives(LEVELS_HLO)["level_totals"] == {"ici": 224, "dcn": 64}
    # The projection sends each level at its own bandwidth (all-reduce moves 2 bytes per result byte).
    report = project(LEVELS_HLO, peak_flops=1e12, memory_bytes_per_s=1e11, link_bytes_per_s=1e9,
                     dcn_bytes_per_s=1e8, granule_of=SLICE_OF)
    assert report["link_bytes_by_level"] == {"ici": 32 * 2 + 128, "dcn": 32 * 2 + 64 * 2 + 32}
    assert report["collectives_s_by_level"]["ici"] == pytest.approx(192 / 1e9)
    assert report["collectives_s_by_level"]["dcn"] == pytest.approx(224 / 1e8)


def test_replica_groups_count_positions_in_the_mesh_device_order():
    """What granule_of assumes: a compiled SPMD program's groups index mesh.devices.flat, not device ids."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    devices = jax.devices()[:8]
    mesh = Mesh(np.array([devices[i] for i in (0, 2, 4, 6, 1, 3, 5, 7)]).reshape(2, 4), ("across", "inside"))
    spec = P(("across", "inside"))
    step = jax.jit(jax.shard_map(lambda x: (jax.lax.psum(x, "inside"), jax.lax.psum(jnp.tile(x, 3), "across")),
                                 mesh=mesh, in_specs=spec, out_specs=(spec, spec)))
    hlo = step.lower(jnp.zeros(8)).compile().as_text()
    # Pretend even devices are one slice, odd ones another: the rows of this mesh.
    c = collectives(hlo, [d.id % 2 for d in mesh.devices.flat])
    assert c["by_level"]["all-reduce"] == {"ici": 4, "dcn": 3 * 4}


def aot_check(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JAX_PLATFORMS", None)  # the tool sets what it needs itself
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_check.py"), "--config", "shakespeare_celo2",
                           "--out", str(tmp_path), *args], capture_output=True, text=True, env=env, timeout=600)


def test_a_tiny_model_fits_a_v5e_4_and_the_report_adds_up(tmp_path):
    done = aot_check(tmp_path, "--topology", "v5e-4", *TINY, "--optimizer.name=adamw")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "aot_check.json").read_text())
    assert report["fits"] and report["devices"] == 4 and report["mesh"]["fsdp"] == 4
    b = report["bytes_per_device"]
    # The arguments are the train state split 4 ways plus this device's 4 of the 16 rows of 33 int32
    # tokens. The state is AdamW's: parameters, mu and nu, 12 bytes a parameter. The tiny model at
    # d 128 in closed form: embeddings (512 tokens, 64 positions), 2 blocks of 12 d^2 + 13 d, the final
    # LayerNorm. Only its vectors (0.8% of it) may be replicated, and padded to whole TPU tiles:
    # together under 5% more.
    d, layers = 128, 2
    n_params = (512 + 64) * d + layers * (12 * d * d + 13 * d) + 2 * d
    sharded = 12 * n_params / 4 + 4 * 33 * 4
    assert sharded <= b["argument"] <= 1.05 * sharded, (b["argument"], sharded)
    assert b["peak"] < report["hbm_bytes_per_device"]
    # The step's FLOPs are the model's 6N per token plus attention, then LayerNorm, softmax and
    # AdamW's few per parameter: no remat here, so nothing is recomputed.
    step = report["step"]
    assert step["model_flops_per_device"] <= step["flops_per_device"] <= 1.3 * step["model_flops_per_device"]
    assert 0 < report["optimizer_share"]["flops"] < 0.05
    assert report["collectives"]["per_step"]["all-gather"]["count"] > 0  # fsdp gathers weights
    assert report["collectives"]["level_totals"]["dcn"] == 0 and report["mesh_levels"] is None  # one slice
    low, high = report["projection"]["mfu_range"]
    assert 0 < low <= high <= 1
    assert "Fits" in (tmp_path / "aot_check.md").read_text()


@pytest.mark.parametrize("across", ["data", "fsdp"])
def test_two_v5e_8_slices_split_their_collectives_by_level(tmp_path, across):
    mesh = [] if across == "data" else ["--mesh.dcn_data=1", "--mesh.dcn_fsdp=2"]
    done = aot_check(tmp_path, "--topology", "v5e-8", "--slices", "2", *TINY, "--optimizer.name=adamw", *mesh)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "aot_check.json").read_text())
    assert report["fits"] and (report["devices"], report["slices"]) == (16, 2)
    dcn_data, dcn_fsdp = (2, 1) if across == "data" else (1, 2)
    assert report["mesh_levels"]["across"] == {"data": dcn_data, "fsdp": dcn_fsdp, "tensor": 1}
    assert report["mesh_levels"]["inside"] == {"data": 1, "fsdp": 8, "tensor": 1}
    dcn = {kind: v["dcn"] for kind, v in report["collectives"]["by_level"].items()}
    if across == "data":
        d, layers = 128, 2
        n_params = (512 + 64) * d + layers * (12 * d * d + 13 * d) + 2 * d
        # Each device holds 1/8 of the f32 gradients (FSDP over the 8 chips of its slice). Data parallel
        # across the slices: each step all-reduces that shard with its twin in the other slice, once (one
        # micro-batch here), and nothing else crosses. Replicated vectors go whole and arrays are padded
        # to TPU tiles (8 x 128), which the tiny model's small arrays feel: between 0.5x and 3x the shard.
        shard = 4 * n_params / 8
        assert 0.5 * shard <= dcn["all-reduce"] <= 3 * shard, (dcn, shard)
        assert dcn["all-reduce"] == sum(dcn.values())  # the weights are gathered inside each slice only
    else:
        assert dcn["all-gather"] > 0  # FSDP across slices gathers the weights over the DCN too
    assert report["collectives"]["level_totals"]["dcn"] == sum(dcn.values())
    assert report["collectives"]["level_totals"]["ici"] > 0
    assert report["projection"]["collectives_s_by_level"]["dcn"] > 0
    assert report["chip"]["dcn_bytes_per_s"] == 25e9 / 8
    assert "between slices (DCN)" in (tmp_path / "aot_check.md").read_text()


def test_an_oversized_setting_exits_2_with_one_line(tmp_path):
    done = aot_check(tmp_path, "--topology", "v5e-4", "--model.size=tiny", "--data.seq_len=64",
                     "--data.global_batch=65536", "--data.micro_batch=65536")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not fit v5e-4" in errors[0] and "GiB" in errors[0]
    assert "lower data.micro_batch" in errors[0] and "model.remat=dots" in errors[0]
    assert json.loads((tmp_path / "aot_check.json").read_text())["fits"] is False


def test_an_unknown_slice_is_one_error_line(tmp_path):
    done = aot_check(tmp_path, "--topology", "v5e-3", *TINY)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: v5e-3 is not a single-slice shape")


@pytest.mark.parametrize("name, kind, count", [("h100-1", "h100", 1), ("H200-8", "h200", 8)])
def test_gpu_nodes_are_named_by_gpu_and_count(name, kind, count):
    s = parse_topology(name)
    assert (s.chip.kind, s.chips, s.grid) == (kind, count, f"1x1x{count}")


@pytest.mark.parametrize("name", ["h100-3", "a100-8", "h200"])
def test_unknown_gpu_nodes_are_refused_naming_the_known_ones(name):
    with pytest.raises(ValueError, match="h100-1, h100-8, h200-1, h200-8|unknown topology"):
        parse_topology(name)


def test_a_tiny_model_compiles_for_an_h100_with_cudnn_attention_and_a_projection(tmp_path):
    done = aot_check(tmp_path, "--topology", "h100-1", *TINY, "--model.compute_dtype=bfloat16",
                     "--optimizer.name=adamw")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "aot_check.json").read_text())
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["fits"]
    assert any("fmha" in target for target in report["custom_calls"])  # cuDNN's fused attention
    step = report["step"]
    # cuDNN's causal kernel skips the masked half of attention, which the model's count includes (2% here).
    assert 0.95 * step["model_flops_per_device"] <= step["flops_per_device"] <= 1.3 * step["model_flops_per_device"]
    fast, slow = report["projection"]["step_s_range"]
    # No faster than the FLOPs at the peak or the argument bytes at the memory's speed.
    floor = max(step["flops_per_device"] / report["chip"]["peak_bf16_flops"],
                report["bytes_per_device"]["argument"] / report["chip"]["hbm_bytes_per_s"])
    assert floor <= fast <= slow
    assert "Projected step" in (tmp_path / "aot_check.md").read_text()


def test_an_unknown_gpu_node_is_one_error_line(tmp_path):
    done = aot_check(tmp_path, "--topology", "h100-4", *TINY)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: unknown GPU topology 'h100-4'") and "h200-8" in lines[-1]


def test_an_out_path_that_is_a_file_is_refused_before_compiling(tmp_path):
    taken = tmp_path / "report.txt"
    taken.write_text("mine")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_check.py"), "--config", "shakespeare_celo2",
                           "--topology", "v5e-4", *TINY, "--out", str(taken)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 1 and taken.read_text() == "mine"
    assert done.stderr.strip().splitlines()[-1] == f"error: --out {taken} is a file; name a directory for " \
                                                   "aot_check.json and aot_check.md"
    assert "compiling" not in done.stdout
