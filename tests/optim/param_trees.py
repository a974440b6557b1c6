"""Parameter trees shaped like the GPT model's, as plain dicts (no dependency on model/).

Imported by the other harness tests; it holds no tests itself.
"""
import jax
import jax.numpy as jnp
import numpy as np

L, D, V, T = 2, 8, 16, 8  # layers, width, vocab, context

# Expected branch of every leaf under the default routing, for optimizer "celo2".
EXPECTED_CELO2 = {
    "wte": "adamw", "wpe": "adamw",
    "blocks/ln_1/scale": "adamw", "blocks/ln_1/bias": "adamw",
    "blocks/attn/qkv/kernel": "celo2", "blocks/attn/qkv/bias": "adamw",
    "blocks/attn/proj/kernel": "celo2", "blocks/attn/proj/bias": "adamw",
    "blocks/ln_2/scale": "adamw", "blocks/ln_2/bias": "adamw",
    "blocks/mlp/fc/kernel": "celo2", "blocks/mlp/fc/bias": "adamw",
    "blocks/mlp/proj/kernel": "celo2", "blocks/mlp/proj/bias": "adamw",
    "ln_f/scale": "adamw", "ln_f/bias": "adamw",
}


def gpt_shapes(n_layer=L, d=D, vocab=V, context=T) -> dict:
    """Nested dict of shapes with the model's paths; per-layer tensors stacked on axis 0."""
    def dense(fan_in, fan_out):
        return {"kernel": (n_layer, fan_in, fan_out), "bias": (n_layer, fan_out)}

    def ln(stack=(n_layer,)):
        return {"scale": (*stack, d), "bias": (*stack, d)}

    return {
        "wte": (vocab, d),
        "wpe": (context, d),
        "blocks": {
            "ln_1": ln(),
            "attn": {"qkv": dense(d, 3 * d), "proj": dense(d, d)},
            "ln_2": ln(),
            "mlp": {"fc": dense(d, 4 * d), "proj": dense(4 * d, d)},
        },
        "ln_f": ln(()),
    }


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def random_tree(shapes, seed=0, scale=1.0):
    # numpy's generator: jax.random would compile once per distinct shape.
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for s in leaves])


def abstract_tree(shapes):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=_is_shape)


def flat(tree) -> dict:
    """{"a/b/c": leaf} of a nested dict tree."""
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
    a, e = flat(actual), flat(expected)
    assert a.keys() == e.keys()
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(e[name]), rtol=rtol, atol=atol, err_msg=name)
