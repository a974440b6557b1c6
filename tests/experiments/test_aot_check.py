"""The ahead-of-time compile check: real TPU and GPU compiles on this CPU, through their runtimes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.experiments.hlo_collectives import collectives
from recipes.experiments.aot_check import parse_topology
from recipes.experiments.tpu_slices import parse_slice

ROOT = Path(__file__).resolve().parents[2]
# d_model 128: TPU arrays are stored in tiles 128 wide, so a 64-wide model's arrays would be half padding.
TINY = ["--model.size=tiny", "--model.d_model=128", "--model.vocab_size=512", "--data.seq_len=32", "--data.global_batch=16"]


@pytest.mark.parametrize("name, chips, topology", [
    ("v5e-8", 8, "v5e:2x4"), ("v5e-4", 4, "v5e:2x2"), ("v6e-16", 16, "v6e:4x4"),
    ("v5p-8", 4, "v5p:2x2x1"), ("v5p-32", 16, "v5p:2x2x4"), ("v4-8", 4, "v4:2x2x1")])
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
    low, high = report["projection"]["mfu_range"]
    assert 0 < low <= high <= 1
    assert "Fits" in (tmp_path / "aot_check.md").read_text()


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
