"""Celo2's arithmetic: golden vectors from the reference, tensor ranks, jit, optax composition, sharding, memory."""

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

# The import path of the authors' release, which users copy: it must keep working.
from recipes.celo2 import init_theta, load_checkpoint, normalized_momentum_theta, scale_by_celo2

DATA = Path(__file__).resolve().parents[1] / "fixtures"
GOLDEN_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def golden_theta():
    return load_checkpoint(DATA / "celo2_golden_theta.state")


@pytest.fixture(scope="module")
def random_theta():
    return init_theta(jax.random.key(3))


@pytest.mark.parametrize("orthogonalize", [False, True], ids=["celo2_base", "celo2"])
def test_golden_vectors(golden_theta, orthogonalize):
    vectors = np.load(DATA / "celo2_golden_vectors.npz")
    meta = json.loads((DATA / "celo2_golden_meta.json").read_text())
    prefix = f"o{int(orthogonalize)}"
    n = len(meta["shapes"])
    tx = scale_by_celo2(golden_theta, orthogonalize=orthogonalize)
    update = jax.jit(tx.update)
    state = tx.init([vectors[f"{prefix}/t0/p{i}/param"] for i in range(n)])
    worst = 0.0
    for t in range(meta["steps"]):
        params = [vectors[f"{prefix}/t{t}/p{i}/param"] for i in range(n)]
        grads = [vectors[f"{prefix}/t{t}/p{i}/grad"] for i in range(n)]
        steps, state = update(grads, state, params)
        for i in range(n):
            expected = vectors[f"{prefix}/t{t}/p{i}/update"]
            assert steps[i].shape == expected.shape
            worst = max(worst, float(np.abs(np.asarray(steps[i]) - expected).max()))
    assert worst <= GOLDEN_TOLERANCE, f"max abs difference {worst:.3g} exceeds {GOLDEN_TOLERANCE}"
    assert int(state.count) == meta["steps"]


def _run(tx, params, grads_per_step):
    state = tx.init(params)
    out = []
    for grads in grads_per_step:
        steps, state = tx.update(grads, state, params)
        out.append(steps)
    return out


def _grads(key, shape, n=3):
    return [jax.random.normal(k, shape) * scale for k, scale in zip(jax.random.split(key, n), (1.0, 1e-3, 50.0))]


@pytest.mark.parametrize("orthogonalize", [False, True])
def test_stacked_tensor_equals_each_matrix_alone(random_theta, orthogonalize):
    tx = scale_by_celo2(random_theta, orthogonalize=orthogonalize)
    param = jax.random.normal(jax.random.key(0), (3, 6, 10)) * 0.1
    grads = _grads(jax.random.key(1), param.shape)
    stacked = _run(tx, param, grads)
    for layer in range(param.shape[0]):
        alone = _run(tx, param[layer], [g[layer] for g in grads])
        for s, a in zip(stacked, alone):
            np.testing.assert_allclose(s[layer], a, atol=2e-5)
    # each trailing matrix is normalized to RMS 1 on its own
    rms = jnp.sqrt(jnp.mean(stacked[-1] ** 2, axis=(-2, -1)))
    np.testing.assert_allclose(rms, 1.0, atol=1e-4)


@pytest.mark.parametrize("shape", [(32, 10), (3, 40, 6), (10, 32)], ids=["tall", "stacked_tall", "wide"])
@pytest.mark.parametrize("orthogonalize", [False, True], ids=["celo2_base", "celo2"])
def test_small_matrices_processed_transposed_equal_the_direct_rule(random_theta, shape, orthogonalize):
    direct = scale_by_celo2(random_theta, orthogonalize=orthogonalize, transpose_below=0)
    fast = scale_by_celo2(random_theta, orthogonalize=orthogonalize)
    param = jax.random.normal(jax.random.key(0), shape) * 0.1
    grads = _grads(jax.random.key(1), shape)
    for a, b in zip(_run(direct, param, grads), _run(fast, param, grads)):
        # Equal up to float32 reassociation in the reductions (they sum the last axis first,
        # which transposing changes), carried to the output by the MLP and Newton-Schulz:
        # measured at most 2.3e-6 of the largest element (updates have RMS 1).
        assert float(jnp.max(jnp.abs(a - b))) <= 5e-6 * float(jnp.max(jnp.abs(a)))
    # the state is kept in the parameter's own layout either way
    state_direct = direct.init(param)
    state_fast = fast.init(param)
    _, state_direct = direct.update(grads[0], state_direct, param)
    _, state_fast = fast.update(grads[0], state_fast, param)
    for a, b in zip(jax.tree.leaves(state_direct), jax.tree.leaves(state_fast)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_batch_axes_make_stacked_vectors_independent(random_theta):
    tx_stacked = scale_by_celo2(random_theta, orthogonalize=False, batch_axes=lambda path, shape: 1)
    tx_single = scale_by_celo2(random_theta, orthogonalize=False)
    param = jax.random.normal(jax.random.key(0), (4, 12))
    grads = _grads(jax.random.key(1), param.shape)
    stacked = _run(tx_stacked, param, grads)
    for layer in range(4):
        alone = _run(tx_single, param[layer], [g[layer] for g in grads])
        for s, a in zip(stacked, alone):
            np.testing.assert_allclose(s[layer], a, atol=2e-5)


def test_scalar_parameter_is_a_length_one_vector(random_theta):
    tx = scale_by_celo2(random_theta)
    scalar, vector = jnp.float32(0.3), jnp.full((1,), 0.3)
    grads = [jnp.float32(g) for g in (0.5, -2.0, 1e-4)]
    from_scalar = _run(tx, scalar, grads)
    from_vector = _run(tx, vector, [jnp.full((1,), g) for g in grads])
    for s, v in zip(from_scalar, from_vector):
        assert s.shape == ()
        np.testing.assert_allclose(s, v[0], atol=1e-6)
        assert abs(abs(float(s)) - 1.0) < 1e-3  # RMS 1 of one element


def test_rank1_steps_have_rms_one_and_tall_matrices_are_handled(random_theta):
    tx = scale_by_celo2(random_theta, orthogonalize=True)
    params = {"bias": jnp.zeros(7), "tall": jnp.ones((12, 5)) * 0.01, "wide": jnp.ones((5, 12)) * 0.01}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    steps, _ = tx.update(grads, tx.init(params), params)
    for name, step in steps.items():
        assert step.shape == params[name].shape
        assert abs(float(jnp.sqrt(jnp.mean(step**2))) - 1.0) < 1e-3, name


def test_orthogonalized_step_is_near_orthogonal():
    # With the normalized-momentum theta, Celo2's first step is the orthogonalized gradient direction.
    tx = scale_by_celo2(normalized_momentum_theta(), orthogonalize=True)
    param = jnp.zeros((16, 48))
    grad = jax.random.normal(jax.random.key(0), param.shape)
    step, _ = tx.update(grad, tx.init(param), param)
    singular_values = jnp.linalg.svd(step, compute_uv=False)
    # Muon's quintic iteration leaves singular values in roughly [0.7, 1.2] before the RMS scaling.
    ratio = singular_values.max() / singular_values.min()
    assert ratio < 2.0, singular_values


def test_jit_chain_and_multisteps(random_theta):
    params = {"w": jax.random.normal(jax.random.key(0), (8, 12)) * 0.1, "b": jnp.zeros(12)}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    lr, wd = 1e-2, 0.1
    tx = optax.chain(scale_by_celo2(random_theta), optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))
    eager_updates, _ = tx.update(grads, tx.init(params), params)
    jit_updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    raw_steps, _ = scale_by_celo2(random_theta).update(grads, scale_by_celo2(random_theta).init(params), params)
    for name in params:
        np.testing.assert_allclose(eager_updates[name], jit_updates[name], atol=1e-6)
        np.testing.assert_allclose(eager_updates[name], -lr * (raw_steps[name] + wd * params[name]), atol=1e-6)

    # MultiSteps over 2 micro-batches: no update after the first, the mean gradient's step after the second.
    accumulated = optax.MultiSteps(tx, every_k_schedule=2)
    state = accumulated.init(params)
    half = jax.tree.map(lambda g: 0.5 * g, grads)
    first, state = jax.jit(accumulated.update)(jax.tree.map(lambda g: 1.5 * g, grads), state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(first))
    second, state = jax.jit(accumulated.update)(half, state, params)
    expected, _ = tx.update(grads, tx.init(params), params)  # mean of 1.5g and 0.5g is g
    for name in params:
        np.testing.assert_allclose(second[name], expected[name], atol=1e-5)


def test_bfloat16_parameters_keep_their_dtype(random_theta):
    tx = scale_by_celo2(random_theta)
    params = jnp.ones((4, 6), jnp.bfloat16)
    steps, state = tx.update(jnp.ones((4, 6), jnp.bfloat16), tx.init(params), params)
    assert steps.dtype == jnp.bfloat16
    assert state.tensors.momentum[0].dtype == jnp.float32


def test_state_is_four_floats_per_element_plus_factored_statistics(random_theta):
    tx = scale_by_celo2(random_theta)
    params = {"matrix": jax.ShapeDtypeStruct((12, 64, 256), jnp.float32), "vector": jax.ShapeDtypeStruct((256,), jnp.float32)}
    state = jax.eval_shape(tx.init, params)
    matrix_state = state.tensors["matrix"]
    per_element = matrix_state.momentum + (matrix_state.second_moment,)
    assert [x.shape for x in per_element] == [(12, 64, 256)] * 4
    assert [x.shape for x in matrix_state.row] == [(12, 64)] * 3
    assert [x.shape for x in matrix_state.col] == [(12, 256)] * 3
    assert matrix_state.full == ()
    assert [x.shape for x in state.tensors["vector"].full] == [(256,)] * 3


@pytest.mark.parametrize("orthogonalize", [False, True])
def test_temporary_memory_is_at_most_16_bytes_per_parameter(random_theta, orthogonalize):
    # Compiled memory analysis is deterministic (nothing is allocated); the reference needs about
    # 270 bytes per parameter. Shapes: GPT-2 small's hidden matrices, stacked over 2 layers.
    shapes = [(2, 768, 2304), (2, 768, 768), (2, 768, 3072), (2, 3072, 768)]
    tx = scale_by_celo2(random_theta, orthogonalize=orthogonalize)

    def train_update(params, state, grads):  # as a trainer runs it: params and state donated
        steps, state = tx.update(grads, state, params)
        return optax.apply_updates(params, steps), state

    params = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(train_update, donate_argnums=(0, 1)).lower(params, state, params).compile()
    largest = max(int(np.prod(s)) for s in shapes)
    per_parameter = compiled.memory_analysis().temp_size_in_bytes / largest
    assert per_parameter <= 16.0, per_parameter


@pytest.mark.slow
def test_sharded_parameters_give_the_same_updates_without_gathering_features(random_theta):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    params = {
        "stacked": jax.random.normal(jax.random.key(0), (2, 64, 96)) * 0.05,
        "matrix": jax.random.normal(jax.random.key(1), (96, 32)) * 0.05,
        "vector": jax.random.normal(jax.random.key(2), (4096,)),
    }
    specs = {"stacked": P(None, "fsdp", None), "matrix": P("fsdp", None), "vector": P("fsdp")}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    for orthogonalize in (False, True):
        tx = scale_by_celo2(random_theta, orthogonalize=orthogonalize)
        expected = _run(tx, params, [grads, jax.tree.map(lambda g: -3.0 * g, grads)])
        sharded_params = jax.device_put(params, shardings)
        sharded_grads = jax.device_put(grads, shardings)
        update = jax.jit(tx.update)
        state = jax.jit(tx.init)(sharded_params)
        for step_expected, grads_now in zip(expected, [sharded_grads, jax.tree.map(lambda g: -3.0 * g, sharded_grads)]):
            steps, state = update(grads_now, state, sharded_params)
            for name in params:
                assert steps[name].sharding.is_equivalent_to(shardings[name], steps[name].ndim)
                # Sharded sums are reassociated: float32 agreement relative to the largest entry.
                scale = float(jnp.abs(step_expected[name]).max())
                np.testing.assert_allclose(steps[name], step_expected[name], atol=5e-5 * scale)
        if not orthogonalize:
            # Celo2-base exchanges only per-shard partial sums and factored statistics:
            # nothing per element is gathered, so every gather is smaller than the smallest
            # shard of a tensor (the matrix's 96 x 32 / 8 = 384 elements).
            hlo = update.lower(sharded_grads, state, sharded_params).compile().as_text()
            gathered = [_gathered_elements(line) for line in hlo.splitlines() if " all-gather" in line]
            assert gathered and max(gathered) < 384, sorted(gathered)[-3:]


def _gathered_elements(hlo_line: str) -> int:
    shapes = re.findall(r"f32\[([0-9,]*)\]", hlo_line.split("=", 1)[1].split("all-gather")[0])
    return max(math.prod(int(d) for d in s.split(",") if d) for s in shapes)


def test_missing_params_is_a_clear_error(random_theta):
    tx = scale_by_celo2(random_theta)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(jnp.ones(3), tx.init(jnp.ones(3)))
