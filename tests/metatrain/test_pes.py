"""PES on problems whose gradients are known in closed form."""
import jax
import jax.numpy as jnp
import numpy as np

from recipes.metatrain.pes import init_pes_state, pes_truncation

TARGET = jnp.array([0.5, -1.0, 2.0])


def _never_reset(inner, key):
    return inner, jnp.zeros((), bool)


def test_quadratic_gradient_matches_true_gradient():
    theta = {"w": jnp.array([1.0, 1.0, 1.0])}

    def unroll(th, inner, key):  # loss 0.5 |theta - target|^2, gradient theta - target
        return inner, 0.5 * jnp.sum((th["w"] - TARGET) ** 2)

    pairs = 4096
    state = init_pes_state(theta, {"x": jnp.zeros((pairs,))})
    _, grad, losses, _ = jax.jit(lambda t, s, k: pes_truncation(t, s, k, sigma=0.01, unroll=unroll,
                                                                 maybe_reset=_never_reset))(theta, state, jax.random.key(0))
    np.testing.assert_allclose(grad["w"], theta["w"] - TARGET, atol=0.1)
    assert losses.shape == (2 * pairs,)


def test_antithetic_pairs_share_data_and_resets():
    theta = {"w": jnp.zeros((2,))}

    def unroll(th, inner, key):  # depends on the key (data) only: a pair's losses must agree exactly
        x = inner["x"] + jax.random.normal(key, ())
        return {"x": x}, x

    def reset_all(inner, key):
        return {"x": jax.random.normal(key, ())}, jnp.ones((), bool)

    state = init_pes_state(theta, {"x": jnp.arange(3.0)})
    state, grad, losses, resets = pes_truncation(theta, state, jax.random.key(1), sigma=0.1, unroll=unroll,
                                                 maybe_reset=reset_all)
    np.testing.assert_array_equal(losses[:3], losses[3:])
    np.testing.assert_array_equal(state.inner["x"][:3], state.inner["x"][3:])
    np.testing.assert_array_equal(grad["w"], 0.0)
    assert bool(resets.all())

    # The two halves see theta + eps and theta - eps: their losses (sum of theta) add to 2 * sum(theta).
    jitted = jax.jit(lambda t, s, k: pes_truncation(t, s, k, sigma=0.1, unroll=lambda th, i, kk: (i, jnp.sum(th["w"])),
                                                   maybe_reset=_never_reset))
    _, _, losses, _ = jitted({"w": jnp.full((2,), 3.0)}, state, jax.random.key(2))
    np.testing.assert_allclose(losses[:3] + losses[3:], 12.0, rtol=1e-6)
    assert not np.allclose(losses[:3], losses[3:])


def test_persistence_accumulates_across_truncations():
    """x_k = k * theta after k truncations; loss_k = 0.5 |x_k|^2 has gradient k^2 theta.

    Truncated ES, which forgets earlier perturbations, would estimate k * theta.
    """
    theta = {"w": jnp.array([1.0, -0.5])}

    def unroll(th, inner, key):
        x = inner["x"] + th["w"]
        return {"x": x}, 0.5 * jnp.sum(x**2)

    pairs = 8192
    state = init_pes_state(theta, {"x": jnp.zeros((pairs, 2))})
    step = jax.jit(lambda s, k: pes_truncation(theta, s, k, sigma=0.01, unroll=unroll, maybe_reset=_never_reset))
    for k in range(1, 4):
        state, grad, _, _ = step(state, jax.random.key(k))
    np.testing.assert_allclose(grad["w"], 9.0 * theta["w"], rtol=0.15)
    # The accumulated perturbation is the sum of three independent draws: std sigma * sqrt(3).
    np.testing.assert_allclose(float(jnp.std(state.accum["w"])), 0.01 * np.sqrt(3), rtol=0.05)


def test_reset_clears_accumulated_perturbation():
    theta = {"w": jnp.zeros((2,))}
    state = init_pes_state(theta, {"x": jnp.zeros((4,))})
    unroll = lambda th, inner, key: (inner, jnp.sum(th["w"]))  # noqa: E731
    state, *_ = pes_truncation(theta, state, jax.random.key(0), sigma=0.1, unroll=unroll, maybe_reset=_never_reset)
    first = state.accum["w"]
    reset = lambda inner, key: (inner, jnp.ones((), bool))  # noqa: E731
    state, *_ = pes_truncation(theta, state, jax.random.key(1), sigma=0.1, unroll=unroll, maybe_reset=reset)
    # After a reset only the newest perturbation remains: its std is sigma, not sigma * sqrt(2).
    assert not np.allclose(state.accum["w"], first)
    np.testing.assert_array_less(np.abs(state.accum["w"]), 0.5)
