"""The kernel-by-kernel step projection: FLOPs, bytes and loop counts read from compiled programs."""
import jax
import jax.numpy as jnp
import pytest

from recipes.experiments.hlo_collectives import collectives, trip_count
from recipes.experiments.hlo_roofline import Program, project

LAYERS = """HloModule step

%fused_matmul (p0: bf16[12,64,128], p1: bf16[32,64], p2: s32[]) -> bf16[32,128] {
  %p0 = bf16[12,64,128]{2,1,0} parameter(0)
  %p1 = bf16[32,64]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %w = bf16[1,64,128]{2,1,0} dynamic-slice(%p0, %p2, %z, %z), dynamic_slice_sizes={1,64,128}
  %w2 = bf16[64,128]{1,0} bitcast(%w)
  ROOT %d = bf16[32,128]{1,0} dot(%p1, %w2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_save (p0: f32[12,32,128], p1: bf16[32,128], p2: s32[]) -> f32[12,32,128] {
  %p0 = f32[12,32,128]{2,1,0} parameter(0)
  %p1 = bf16[32,128]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %c = f32[32,128]{1,0} convert(%p1)
  %u = f32[1,32,128]{2,1,0} bitcast(%c)
  ROOT %s = f32[12,32,128]{2,1,0} dynamic-update-slice(%p0, %u, %p2, %z, %z)
}

%cond (p: (s32[], f32[12,32,128])) -> pred[] {
  %p = (s32[], f32[12,32,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[12,32,128])) -> (s32[], f32[12,32,128]) {
  %p = (s32[], f32[12,32,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %acc = f32[12,32,128]{2,1,0} get-tuple-element(%p), index=1
  %x = bf16[32,64]{1,0} parameter(1)
  %ws = bf16[12,64,128]{2,1,0} parameter(2)
  %y = bf16[32,128]{1,0} fusion(%ws, %x, %i), kind=kOutput, calls=%fused_matmul
  %saved = f32[12,32,128]{2,1,0} fusion(%acc, %y, %i), kind=kLoop, calls=%fused_save
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[12,32,128]{2,1,0}) tuple(%next, %saved)
}

ENTRY %main (a: f32[12,32,128]) -> (s32[], f32[12,32,128]) {
  %a = f32[12,32,128]{2,1,0} parameter(0)
  %zero = s32[] constant(0)
  %t0 = (s32[], f32[12,32,128]{2,1,0}) tuple(%zero, %a)
  ROOT %w = (s32[], f32[12,32,128]{2,1,0}) while(%t0), condition=%cond, body=%body
}
"""


def test_a_layer_loop_counts_each_kernel_per_iteration_and_moves_only_its_slices():
    kernels = {k["name"]: k for k in Program(LAYERS).kernels()}
    matmul, save = kernels["y"], kernels["saved"]
    assert matmul["launches"] == save["launches"] == 12
    assert matmul["flops"] == 2 * 32 * 128 * 64
    # One layer's weights (64 x 128 bf16) and the input, not the stack of 12; the output.
    assert matmul["bytes"] == 64 * 128 * 2 + 32 * 64 * 2 + 32 * 128 * 2
    # The saved activation: the bf16 input and one layer's float32 slice written, not the whole stack.
    assert save["bytes"] == 32 * 128 * 2 + 32 * 128 * 4
    report = project(LAYERS, peak_flops=1e12, memory_bytes_per_s=1e11, link_bytes_per_s=None)
    assert report["flops"] == 12 * 2 * 32 * 128 * 64
    fast, slow = report["step_s_range"]
    assert 0 < fast <= slow


def test_loops_that_step_by_two_or_carry_a_known_trip_count():
    windowed = {
        "cond": ["  %p = (u32[], f32[8]) parameter(0)", "  %i = u32[]{:T(128)} get-tuple-element(%p), index=0",
                 "  %n = u32[]{:T(128)} constant(4)", "  ROOT %lt = pred[] compare(%i, %n), direction=LT"],
        "body": ["  %p = (u32[], f32[8]) parameter(0)", "  %i = u32[]{:T(128)} get-tuple-element(%p), index=0",
                 "  %one = u32[]{:T(128)} constant(1)", "  %two = u32[]{:T(128)} constant(2)",
                 "  %partner = u32[] add(%i, %one)", "  %next = u32[]{:T(128)} add(%i, %two)",
                 "  ROOT %t = (u32[], f32[8]) tuple(%next, %x)"]}
    assert trip_count(windowed, "cond", "body") == 2  # the +1 is a partner index, not the counter's step
    assert trip_count({}, "c", "b", 'backend_config={"known_trip_count":{"n":"24"}}') == 24
    assert trip_count({"c": ["  ROOT %x = pred[] parameter(0)"]}, "c", "b") is None


def test_a_convolution_that_folds_batch_dims_into_its_window_counts_only_real_taps():
    # A batched matmul (batch 4 x 12, 1024 x 64 by 64 x 1024) written as the TPU compiler writes it.
    hlo = """HloModule m

ENTRY %main (a: bf16[4,12,1024,64], b: bf16[4,12,64,1024]) -> f32[4,12,1024,1024] {
  %a = bf16[4,12,1024,64]{3,2,1,0} parameter(0)
  %b = bf16[4,12,64,1024]{3,2,1,0} parameter(1)
  ROOT %c = f32[4,12,1024,1024]{3,2,1,0} convolution(%a, %b), window={size=4x12 stride=3x11 lhs_dilate=4x12}, dim_labels=01bf_01io->01bf
}
"""
    [conv] = Program(hlo).kernels()
    assert conv["flops"] == 2 * 4 * 12 * 1024 * 1024 * 64


def test_a_compiled_matmul_is_counted_as_its_flops():
    a = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    b = jax.ShapeDtypeStruct((512, 128), jnp.float32)
    hlo = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(a, b).compile().as_text()
    report = project(hlo, peak_flops=1e12, memory_bytes_per_s=1e11, link_bytes_per_s=None)
    assert report["flops"] == pytest.approx(2 * 256 * 512 * 128, rel=0.01)
    # At least the operands and the result cross memory once.
    assert report["bytes"] >= 4 * (256 * 512 + 512 * 128 + 256 * 128)


def test_async_collectives_count_their_result_not_their_context_scalars():
    hlo = """HloModule m

ENTRY %main (a: bf16[1,96,2304]) -> bf16[1,96,2304] {
  %a = bf16[1,96,2304]{2,1,0} parameter(0)
  %s = (bf16[1,96,2304]{2,1,0:T(8,128)(2,1)}, bf16[1,96,2304]{2,1,0:T(8,128)(2,1)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%a), source_target_pairs={{0,1},{1,0}}
  ROOT %d = bf16[1,96,2304]{2,1,0} collective-permute-done(%s)
}
"""
    assert collectives(hlo)["per_step"]["collective-permute"] == {"count": 1, "bytes": 96 * 2304 * 2}
    report = project(hlo, peak_flops=1e12, memory_bytes_per_s=1e11, link_bytes_per_s=1e9)
    assert report["link_bytes"] == 96 * 2304 * 2 and report["collectives_s"] == pytest.approx(96 * 2304 * 2 / 1e9)


def test_collectives_fused_into_a_kernel_go_on_the_links():
    """The TPU compiler's reduce-scatter (an all-reduce fused with each device's slice of it) and its
    async all-gathers sit inside fusions: their bytes cross the links."""
    hlo = """HloModule m

%all-reduce-scatter.3.clone.1 (input.1: bf16[2048,2048]) -> bf16[256,2048] {
  %input.1 = bf16[2048,2048]{1,0} parameter(0)
  %all-reduce.1 = bf16[2048,2048]{1,0:T(8,128)(2,1)} all-reduce(%input.1), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %z = s32[] constant(0)
  ROOT %d = bf16[256,2048]{1,0} dynamic-slice(%all-reduce.1, %z, %z), dynamic_slice_sizes={256,2048}
}

%fused_computation.5 (p: bf16[16,512]) -> (bf16[16,512], bf16[128,512], u32[]) {
  %p = bf16[16,512]{1,0} parameter(0)
  %all-gather.7 = bf16[128,512]{1,0} all-gather(%p), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  ROOT %c = (bf16[16,512]{1,0}, bf16[128,512]{1,0}, u32[]) custom-call(%all-gather.7), custom_call_target="AsyncCollectiveStart"
}

ENTRY %main (a: bf16[2048,2048], b: bf16[16,512]) -> bf16[256,2048] {
  %a = bf16[2048,2048]{1,0} parameter(0)
  %b = bf16[16,512]{1,0} parameter(1)
  %g = (bf16[16,512]{1,0}, bf16[128,512]{1,0}, u32[]) fusion(%b), kind=kCustom, calls=%fused_computation.5
  ROOT %f = bf16[256,2048]{1,0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter.3.clone.1
}
"""
    c = collectives(hlo)["per_step"]
    assert c["reduce-scatter"] == {"count": 1, "bytes": 2048 * 2048 * 2} and c["all-reduce"]["count"] == 0
    assert c["all-gather"] == {"count": 1, "bytes": 128 * 512 * 2}
    report = project(hlo, peak_flops=1e12, memory_bytes_per_s=1e11, link_bytes_per_s=1e9)
    assert report["link_bytes"] == 2048 * 2048 * 2 + 128 * 512 * 2
    assert report["bytes"] > 0  # the kernels still read and write memory
    assert report["link_bytes_by_level"] == {"ici": report["link_bytes"], "dcn": 0}
