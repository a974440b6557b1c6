"""The fused, chunked output layer and loss: the same numbers as full logits, on one device and meshes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, init_params, make_apply, make_loss_fn, make_mesh, next_token_loss, param_shardings
from model.loss import PAD_LOGIT, chunk_length, fused_next_token_loss

VOCAB = 500  # padded to 512: 12 padding ids that must never win
TOKENS = jax.random.randint(jax.random.key(1), (8, 33), 0, VOCAB)


def _reference(graphdef):
    apply = make_apply(graphdef)
    return lambda params, tokens: next_token_loss(apply(params, tokens[:, :-1]), tokens[:, 1:])


def _assert_same(reference, fused, rtol):
    (loss_a, grads_a), (loss_b, grads_b) = reference, fused
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("chunk_tokens", [8, 64, 200, 10**6])
def test_float32_loss_and_grads_equal_the_full_logits_ones(chunk_tokens):
    config = ModelConfig.named("tiny", vocab_size=VOCAB, loss_chunk_tokens=chunk_tokens)
    graphdef, params = init_params(config, seed=0)
    reference = jax.jit(jax.value_and_grad(_reference(graphdef)))(params, TOKENS)
    fused = jax.jit(jax.value_and_grad(make_loss_fn(graphdef)))(params, TOKENS)
    _assert_same(reference, fused, rtol=2e-5)
    # Without a gradient (evaluation) the primal sweep gives the same loss.
    np.testing.assert_allclose(jax.jit(make_loss_fn(graphdef))(params, TOKENS), reference[0], rtol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 2, 4), (2, 1, 4), (1, 8, 1)])
def test_sharded_loss_and_grads_equal_the_single_device_ones(mesh_shape):
    config = ModelConfig.named("tiny", vocab_size=VOCAB, loss_chunk_tokens=64)
    graphdef, params = init_params(config, seed=0)
    reference = jax.jit(jax.value_and_grad(_reference(graphdef)))(params, TOKENS)
    mesh = make_mesh(*mesh_shape)
    with jax.set_mesh(mesh):
        fused = jax.jit(jax.value_and_grad(make_loss_fn(graphdef)))(jax.device_put(params, param_shardings(params, mesh)),
                                                                    TOKENS)
    _assert_same(reference, fused, rtol=2e-5)


def test_bfloat16_grads_are_as_close_to_float32_as_the_full_logits_ones():
    def grads(dtype, loss_of):
        graphdef, params = init_params(ModelConfig.named("tiny", vocab_size=VOCAB, compute_dtype=dtype,
                                                         loss_chunk_tokens=64), seed=0)
        return jax.jit(jax.grad(loss_of(graphdef)))(params, TOKENS)

    exact = grads("float32", _reference)

    def worst_error(approx):
        return max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
                   for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(approx)))

    full, fused = worst_error(grads("bfloat16", _reference)), worst_error(grads("bfloat16", make_loss_fn))
    assert fused <= 1.1 * full and fused < 0.05, (fused, full)


def test_padded_ids_never_win_and_get_no_gradient():
    h = jax.random.normal(jax.random.key(0), (2, 4, 8))
    w = jnp.zeros((16, 8)).at[:10].set(jax.random.normal(jax.random.key(1), (10, 8)))
    w = w.at[10:].set(100.0)  # padding rows that would dominate every softmax if they counted
    targets = jax.random.randint(jax.random.key(2), (2, 4), 0, 10)
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: fused_next_token_loss(h, w, targets, vocab_size=10, chunk_tokens=4), argnums=(0, 1))(h, w)
    logits = jnp.einsum("bld,vd->blv", h, w[:10])
    np.testing.assert_allclose(loss, next_token_loss(logits, targets), rtol=1e-6)
    assert float(jnp.max(jnp.abs(dw[10:]))) == 0.0 and np.isfinite(dh).all()
    assert PAD_LOGIT < -1e8


def test_the_training_program_holds_no_float32_logits_of_the_whole_batch():
    config = ModelConfig.named("tiny", vocab_size=VOCAB, loss_chunk_tokens=64)
    graphdef, params = init_params(config, seed=0)
    hlo = jax.jit(jax.value_and_grad(make_loss_fn(graphdef))).lower(params, TOKENS).compile().as_text()
    positions, padded = TOKENS.shape[0] * (TOKENS.shape[1] - 1), config.padded_vocab_size
    assert f"f32[{positions},{padded}]" not in hlo and f"f32[8,32,{padded}]" not in hlo
    chunk = 8 * chunk_length(8, 32, 64)
    assert f"f32[{chunk},{padded}]" in hlo  # ...only one chunk's


def test_chunk_length_divides_the_sequence_and_bounds_the_chunk():
    assert chunk_length(8, 32, 64) == 8
    assert chunk_length(8, 32, 10**6) == 32
    assert chunk_length(64, 1024, 8192) == 128
    assert chunk_length(3, 10, 16) == 5
    assert chunk_length(100, 7, 16) == 1  # a chunk is at least one position
