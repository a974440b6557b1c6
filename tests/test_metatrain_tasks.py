"""Pieces the PES populations rely on: traced thetas, reparameterization, loss normalization."""
import jax
import jax.numpy as jnp
import numpy as np

from recipes.celo2 import normalized_momentum_theta, scale_by_celo2
from recipes.metatrain.config import PESConfig
from recipes.metatrain.tasks import Task, reparameterized_loss


def test_celo2_takes_a_vmapped_traced_theta():
    theta = jax.tree.map(jnp.asarray, normalized_momentum_theta())
    thetas = jax.tree.map(lambda x: jnp.stack([x, x + 0.01]), theta)
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.arange(12.0).reshape(4, 3)}

    def step(th):
        tx = scale_by_celo2(th)
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates["w"]

    steps = jax.jit(jax.vmap(step))(thetas)
    assert steps.shape == (2, 4, 3) and bool(jnp.all(jnp.isfinite(steps)))
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(steps[0] ** 2)), 1.0, rtol=1e-3)  # Celo2's steps have RMS 1
    assert not np.allclose(steps[0], steps[1])


class _Quadratic(Task):
    name, init_loss, data = "quadratic", 1.0, {}

    def init_params(self, key):
        return {"w": jnp.ones((3,))}

    def loss(self, params, key, data):
        return 0.5 * jnp.sum(params["w"] ** 2)


def test_reparameterization_keeps_the_function_and_scales_gradients():
    task, log_scale = _Quadratic(), jnp.log(10.0)
    loss = reparameterized_loss(task, log_scale)
    prime = {"w": jnp.ones((3,)) / 10.0}
    assert float(loss(prime, None, {})) == float(task.loss({"w": jnp.ones((3,))}, None, {}))
    grad = jax.grad(loss)(prime, None, {})["w"]
    np.testing.assert_allclose(grad, 10.0 * jnp.ones((3,)), rtol=1e-6)  # d/dp' = scale * d/dp


def test_normalized_loss_is_capped_and_nan_safe():
    from recipes.metatrain.config import InnerConfig
    from recipes.metatrain.population import Population

    pop = object.__new__(Population)
    pop.task, pop.pes, pop.inner = _Quadratic(), PESConfig(loss_cap=1.5), InnerConfig()
    out = pop.normalized(jnp.array([0.5, 3.0, jnp.nan, jnp.inf]))
    np.testing.assert_allclose(out, [0.5, 1.5, 1.5, 1.5])
