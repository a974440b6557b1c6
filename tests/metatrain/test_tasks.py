"""Pieces the PES populations rely on: traced thetas, reparameterization, loss normalization."""
import jax
import jax.numpy as jnp
import numpy as np

from recipes.optim.celo2 import scale_by_celo2
from recipes.optim.theta import normalized_momentum_theta
from recipes.metatrain.config import PESConfig
from recipes.metatrain.tasks.base import Task, reparameterized_loss


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


def test_lm_family_reads_a_corpus_that_data_prepare_wrote(tmp_path):
    """A user's own text, prepared into shards, becomes the family's training stream."""
    import numpy as np

    from data.prepare_corpus import prepare_files
    from recipes.metatrain.config import FamilyConfig
    from recipes.metatrain.tasks.lm import TinyLM

    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times."
                                for i in range(400)), encoding="utf-8")
    prepare_files([text], tmp_path / "shards", text_unit="paragraph", val_fraction=0.1, workers=1, progress=False)
    family = FamilyConfig(kind="lm", name="own", n_layer=1, n_head=2, d_model=16, context_length=8, batch=4,
                          vocab=64, corpus=str(tmp_path / "shards"))
    task = TinyLM(family)
    bundled = TinyLM(FamilyConfig(kind="lm", name="bundled", n_layer=1, n_head=2, d_model=16, context_length=8,
                                  batch=4, vocab=64))
    assert int(task.data["n"]) != int(bundled.data["n"])  # another stream than Shakespeare
    assert int(task.data["tokens"].max()) < 64
    loss = task.loss(task.init_params(jax.random.key(0)), jax.random.key(1), task.data)
    assert np.isfinite(float(loss))


def test_lm_family_with_a_missing_corpus_says_how_to_make_one(tmp_path):
    import pytest

    from recipes.metatrain.config import FamilyConfig
    from recipes.metatrain.tasks.lm import TinyLM

    with pytest.raises(FileNotFoundError, match="data.prepare"):
        TinyLM(FamilyConfig(kind="lm", name="x", corpus=str(tmp_path / "nope")))


def test_image_family_dataset_is_checked():
    import pytest

    from recipes.metatrain.config import FamilyConfig

    with pytest.raises(ValueError, match="families\\[\\].dataset must be one of .*, got 'cifar'"):
        FamilyConfig(kind="image_mlp", dataset="cifar")
    assert FamilyConfig(kind="image_mlp", dataset="mnist", hidden=(32,)).name == "mnist_mlp_32"


def test_every_family_kind_a_config_accepts_has_a_task():
    from recipes.metatrain.config import FAMILY_KINDS
    from recipes.metatrain.tasks import FAMILIES

    assert tuple(FAMILIES) == FAMILY_KINDS
