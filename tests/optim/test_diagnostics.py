"""Optimizer diagnostics: values against numpy, edge cases, use inside jit with the harness."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recipes.optim.diagnostics import optimizer_diagnostics
from recipes.optim.config import OptimizerConfig, ScheduleConfig
from recipes.optim.optimizers import build_optimizer, param_labels
from tests.optim.param_trees import flat, gpt_shapes, random_tree

SHAPES = {"w": (4, 6), "b": (6,), "e": (5, 3)}
LABELS = {"w": "celo2", "b": "adamw", "e": "adamw"}


def reference(grads, updates, params, names):
    cat = lambda tree: np.concatenate([np.ravel(tree[n]) for n in names])  # noqa: E731
    g, u, p = cat(grads), cat(updates), cat(params)
    return (np.sqrt(np.mean(u * u)), np.linalg.norm(u) / np.linalg.norm(p),
            -np.dot(u, g) / (np.linalg.norm(u) * np.linalg.norm(g)))


def test_values_per_branch_and_overall():
    grads, updates, params = (random_tree(SHAPES, seed=s) for s in (0, 1, 2))
    out = optimizer_diagnostics(grads, updates, params, LABELS)
    assert set(out) == {f"{m}/{b}" for m in ("update_rms", "update_param_ratio", "update_grad_cos")
                        for b in ("celo2", "adamw", "all")}
    for branch, names in (("celo2", ["w"]), ("adamw", ["b", "e"]), ("all", ["w", "b", "e"])):
        rms, ratio, cos = reference(grads, updates, params, names)
        np.testing.assert_allclose(out[f"update_rms/{branch}"], rms, rtol=1e-5)
        np.testing.assert_allclose(out[f"update_param_ratio/{branch}"], ratio, rtol=1e-5)
        np.testing.assert_allclose(out[f"update_grad_cos/{branch}"], cos, rtol=1e-4, atol=1e-6)


def test_cosine_edge_cases():
    grads, params = random_tree(SHAPES, seed=0), random_tree(SHAPES, seed=1)
    sgd = jax.tree.map(lambda g: -0.1 * g, grads)
    out = optimizer_diagnostics(grads, sgd, params, LABELS)
    np.testing.assert_allclose(out["update_grad_cos/all"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["update_rms/celo2"], 0.1 * np.sqrt(np.mean(np.square(grads["w"]))), rtol=1e-6)
    ascent = optimizer_diagnostics(grads, jax.tree.map(jnp.negative, sgd), params, LABELS)
    np.testing.assert_allclose(ascent["update_grad_cos/adamw"], -1.0, rtol=1e-6)
    zero = optimizer_diagnostics(grads, jax.tree.map(jnp.zeros_like, grads), params, LABELS)
    assert all(float(v) == 0.0 for v in zero.values())  # finite, not NaN, e.g. a warmup's first step at LR 0


def test_mismatched_trees_are_refused():
    trees = [random_tree(SHAPES, seed=s) for s in (0, 1, 2)]
    with pytest.raises(ValueError, match="pass trees of the same structure"):
        optimizer_diagnostics(*trees, {"w": "celo2", "b": "adamw"})


def test_inside_a_jitted_step_with_the_harness():
    shapes = gpt_shapes()
    params, grads = random_tree(shapes, seed=0), random_tree(shapes, seed=1)
    config = OptimizerConfig(name="muon", lr=0.01, schedule=ScheduleConfig(kind="constant"))
    tx, _ = build_optimizer(config, params)
    labels = param_labels(config, params)

    @jax.jit
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return updates, optimizer_diagnostics(grads, updates, params, labels)

    updates, out = step(params, grads, tx.init(params))
    assert {k.split("/")[1] for k in out} == {"muon", "adamw", "all"}
    names = sorted(flat(params))
    _, ratio, cos = reference(flat(grads), flat(updates), flat(params), names)
    np.testing.assert_allclose(out["update_param_ratio/all"], ratio, rtol=1e-5)
    np.testing.assert_allclose(out["update_grad_cos/all"], cos, rtol=1e-4)
    # Adam's first step is -lr * sign(g) up to eps and the decay term: RMS about lr, cosine high.
    assert float(out["update_rms/adamw"]) == pytest.approx(0.01, rel=0.05)
    assert float(out["update_grad_cos/adamw"]) > 0.5
    assert 0.0 < float(out["update_grad_cos/muon"]) < 1.0
