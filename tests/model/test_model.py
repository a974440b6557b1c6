"""GPT model: config, parameter layout and counts, forward semantics, loss, remat, bf16."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import (LOGICAL_RULES, PAD_LOGIT, SIZES, ModelConfig, abstract_params,
                   count_params, init_params, make_apply, make_loss_fn, next_token_loss,
                   split_inputs_targets)
from model.gpt import attend, attention_impl

# vocab 100 pads to 128, so padding behaviour is exercised at tiny size.
TINY = ModelConfig.named("tiny", vocab_size=100)


def _paths(state) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {"/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey)): leaf.shape
            for path, leaf in flat}


def _tokens(shape, vocab=TINY.vocab_size, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.fixture(scope="module")
def tiny():
    return init_params(TINY, seed=0)


def _loss_logits_grads_fn(graphdef):
    """One compiled program giving loss, logits and grads (compiles are the slow part)."""
    apply = make_apply(graphdef)

    def loss_and_logits(params, tokens_BxLp1):
        logits_BxLxV = apply(params, tokens_BxLp1[:, :-1])
        return next_token_loss(logits_BxLxV, tokens_BxLp1[:, 1:]), logits_BxLxV

    return jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))


@pytest.fixture(scope="module")
def run_tiny(tiny):
    """run_tiny(params, tokens (2, 33)) -> ((loss, logits), grads), compiled once."""
    return _loss_logits_grads_fn(tiny[0])


TOKENS = _tokens((2, 33), seed=1)  # the shape every tiny-model test uses


# --- config -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(d_model=65), "divisible by n_head"),
    (dict(n_layer=0), "n_layer must be a positive int"),
    (dict(n_head=-2), "n_head must be a positive int"),
    (dict(vocab_size=1.5), "vocab_size must be a positive int"),
    (dict(compute_dtype="float64"), r"compute_dtype must be one of \['float32', 'bfloat16'\], got 'float64'"),
    (dict(attention_impl="flash"), r"attention_impl must be one of \['auto', 'xla', 'cudnn'\], got 'flash'"),
    (dict(bias=1), "bias must be a bool"),
    (dict(unroll_layers="yes"), "unroll_layers must be a bool"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be a positive number"),
])
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.named("tiny", **overrides)


def test_named_sizes():
    assert ModelConfig.named("gpt2_small") == ModelConfig(
        n_layer=12, d_model=768, n_head=12, context_length=1024)
    assert ModelConfig.named("gpt3_xl").context_length == 2048
    assert ModelConfig.named("tiny", bias=False).bias is False
    assert ModelConfig.named("gpt2_xl").head_dim == 64
    with pytest.raises(ValueError, match="is not a known size"):
        ModelConfig.named("gpt5")
    with pytest.raises(ValueError, match="unknown config key .ModelConfig.n_embd."):
        ModelConfig.named("tiny", n_embd=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.n_layer = 3


def test_padded_vocab_size():
    assert ModelConfig().padded_vocab_size == 50304
    assert ModelConfig(pad_vocab_multiple=1).padded_vocab_size == 50257
    assert TINY.padded_vocab_size == 128
    assert ModelConfig.named("tiny", vocab_size=128).padded_vocab_size == 128


# --- parameters -------------------------------------------------------------------------

def test_published_param_counts():
    small = count_params(ModelConfig.named("gpt2_small"))
    assert small.total == 124_439_808
    assert small.padded_total == 124_439_808 + (50304 - 50257) * 768
    assert count_params(ModelConfig.named("gpt2_small", pad_vocab_multiple=1)).padded_total \
        == 124_439_808
    assert count_params(ModelConfig.named("gpt3_xl")).total == 1_315_723_264  # "1.3B"
    # The other GPT-2 sizes, as reported for the released checkpoints.
    assert count_params(ModelConfig.named("gpt2_medium")).total == 354_823_168
    assert count_params(ModelConfig.named("gpt2_large")).total == 774_030_080
    assert count_params(ModelConfig.named("gpt2_xl")).total == 1_557_611_200


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("bias", [True, False])
def test_param_count_closed_form(size, bias):
    cfg = ModelConfig.named(size, bias=bias)
    d, n = cfg.d_model, cfg.n_layer
    per_layer = 12 * d * d + (13 * d if bias else 2 * d)  # LN scales remain without bias
    expected = (cfg.vocab_size + cfg.context_length) * d + n * per_layer + (2 if bias else 1) * d
    got = count_params(cfg)
    assert got.total == expected
    assert got.non_embedding == expected - (cfg.vocab_size + cfg.context_length) * d


def test_stacked_shapes_at_gpt2_small():
    cfg = ModelConfig.named("gpt2_small")
    _, abstract = abstract_params(cfg)  # shapes only, nothing allocated
    n, d = 12, 768
    assert _paths(abstract) == {
        "wte": (50304, d), "wpe": (1024, d),
        "blocks/ln_1/scale": (n, d), "blocks/ln_1/bias": (n, d),
        "blocks/attn/qkv/kernel": (n, d, 3 * d), "blocks/attn/qkv/bias": (n, 3 * d),
        "blocks/attn/proj/kernel": (n, d, d), "blocks/attn/proj/bias": (n, d),
        "blocks/ln_2/scale": (n, d), "blocks/ln_2/bias": (n, d),
        "blocks/mlp/fc/kernel": (n, d, 4 * d), "blocks/mlp/fc/bias": (n, 4 * d),
        "blocks/mlp/proj/kernel": (n, 4 * d, d), "blocks/mlp/proj/bias": (n, d),
        "ln_f/scale": (d,), "ln_f/bias": (d,),
    }
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))


def test_bias_false_has_no_bias_params():
    _, abstract = abstract_params(ModelConfig.named("tiny", bias=False))
    paths = _paths(abstract)
    assert not [p for p in paths if p.endswith("bias")]
    assert "blocks/ln_1/scale" in paths and "blocks/attn/qkv/kernel" in paths


def test_every_param_has_logical_axes():
    _, abstract = abstract_params(TINY)
    variables = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(variables) == 16
    for v in variables:
        axes = v.get_metadata()["out_sharding"]
        assert len(axes) == len(v.shape)
        assert all(a in LOGICAL_RULES for a in axes)
    blocks = jax.tree.leaves(abstract["blocks"], is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert all(v.get_metadata()["out_sharding"][0] == "layers" for v in blocks)
    assert abstract["blocks"]["mlp"]["fc"]["kernel"].get_metadata()["out_sharding"] == (
        "layers", "embed", "mlp")


def test_init_statistics(tiny):
    cfg = TINY
    p = nnx.to_pure_dict(tiny[1])
    blocks = p["blocks"]

    def std(x):
        return float(np.std(np.asarray(x)))

    assert std(blocks["attn"]["qkv"]["kernel"]) == pytest.approx(0.02, rel=0.03)
    assert std(blocks["mlp"]["fc"]["kernel"]) == pytest.approx(0.02, rel=0.03)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert std(blocks["attn"]["proj"]["kernel"]) == pytest.approx(residual_std, rel=0.03)
    assert std(blocks["mlp"]["proj"]["kernel"]) == pytest.approx(residual_std, rel=0.03)
    assert std(p["wte"][: cfg.vocab_size]) == pytest.approx(0.02, rel=0.03)
    assert std(p["wpe"]) == pytest.approx(0.02, rel=0.05)
    assert not np.any(np.asarray(p["wte"][cfg.vocab_size:]))  # padding rows
    # Every layer gets its own draw.
    assert not np.allclose(blocks["mlp"]["fc"]["kernel"][0], blocks["mlp"]["fc"]["kernel"][1])
    for name in ("ln_1", "ln_2"):
        np.testing.assert_array_equal(blocks[name]["scale"], 1.0)
        np.testing.assert_array_equal(blocks[name]["bias"], 0.0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]:
        if path[-1].key == "bias":
            np.testing.assert_array_equal(leaf, 0.0)


# --- forward ----------------------------------------------------------------------------

def test_forward_shape_and_dtype(tiny, run_tiny):
    graphdef, params = tiny
    (loss, logits), _ = run_tiny(params, TOKENS)
    assert logits.shape == (2, 32, 128)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    apply = make_apply(graphdef)
    full = jax.eval_shape(apply, params, _tokens((3, TINY.context_length)))
    assert full.shape == (3, 64, 128) and full.dtype == jnp.float32
    with pytest.raises(ValueError, match="exceeds context_length"):
        jax.eval_shape(apply, params, _tokens((1, TINY.context_length + 1)))


def test_functional_apply_matches_module(tiny, run_tiny):
    graphdef, params = tiny
    (_, logits), _ = run_tiny(params, TOKENS)
    model = nnx.merge(graphdef, params)
    module_logits = nnx.jit(lambda model, tokens: model(tokens))(model, TOKENS[:, :-1])
    np.testing.assert_allclose(module_logits, logits, rtol=1e-6, atol=1e-6)
    # A plain nested dict of arrays merges into the same model.
    from_pure = nnx.state(nnx.merge(graphdef, nnx.to_pure_dict(params)))
    jax.tree.map(np.testing.assert_array_equal, from_pure, params)


def test_cached_decoding_gives_the_full_forward_logits(tiny, run_tiny):
    """A 10-token prefill, then one token at a time on the key/value cache: the same logits."""
    from model.gpt import empty_kv_cache

    graphdef, params = tiny
    (_, full), _ = run_tiny(params, TOKENS)  # logits of TOKENS[:, :32]
    decode = jax.jit(lambda p, t, c, pos: nnx.merge(graphdef, p).decode(t, c, pos))
    cache = empty_kv_cache(TINY, 2)
    logits, cache = decode(params, TOKENS[:, :10], cache, 0)
    steps = [logits]
    for pos in range(10, 32):
        logits, cache = decode(params, TOKENS[:, pos:pos + 1], cache, pos)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_causality(tiny, run_tiny):
    _, params = tiny
    t = 20
    changed = TOKENS.at[:, t].set((TOKENS[:, t] + 7) % TINY.vocab_size)
    (_, before), _ = run_tiny(params, TOKENS)
    (_, after), _ = run_tiny(params, changed)
    np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    # ...while the changed position and every later one do see it.
    V = TINY.vocab_size
    assert float(jnp.abs(after[:, t:, :V] - before[:, t:, :V]).max(axis=-1).min()) > 1e-4


def test_padded_vocab_never_wins(tiny, run_tiny):
    _, params = tiny
    V = TINY.vocab_size
    # Make the padding rows of the tied table large, so that unmasked they would win.
    params = jax.tree.map(lambda x: x, params)
    params["wte"][...] = params["wte"][...].at[V:].set(10.0)
    (_, logits), grads = run_tiny(params, TOKENS)
    np.testing.assert_array_equal(logits[..., V:], PAD_LOGIT)
    assert int(jnp.argmax(logits, axis=-1).max()) < V
    assert float(jax.nn.softmax(logits, axis=-1)[..., V:].max()) == 0.0
    np.testing.assert_array_equal(grads["wte"][...][V:], 0.0)
    assert float(jnp.abs(grads["wte"][...][:V]).max()) > 0


def test_attention_impl_choice():
    assert attention_impl(TINY, jnp.float32, "cpu") == "xla"
    assert attention_impl(TINY, jnp.float32, "gpu") == "xla"
    assert attention_impl(TINY, jnp.bfloat16, "gpu") == "cudnn"
    assert attention_impl(TINY, jnp.bfloat16, "tpu") == "xla"
    forced = ModelConfig.named("tiny", attention_impl="xla")
    assert attention_impl(forced, jnp.bfloat16, "gpu") == "xla"


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_attend_equals_dot_product_attention(dtype, tol):
    B, L, H, K = 2, 16, 3, 8
    q, k, v, cotangent = (jax.random.normal(key, (B, L, H, K)).astype(dtype)
                          for key in jax.random.split(jax.random.key(0), 4))
    causal = jnp.tril(jnp.ones((L, L), bool))

    def ours(q, k, v):
        return attend(q, k, v, causal)

    def jax_xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    for fn in (ours, jax_xla):
        assert fn(q, k, v).dtype == dtype
    np.testing.assert_allclose(ours(q, k, v).astype(jnp.float32), jax_xla(q, k, v).astype(jnp.float32),
                               atol=tol, rtol=tol)
    grad = lambda fn: jax.grad(lambda *a: jnp.sum((fn(*a) * cotangent).astype(jnp.float32)),  # noqa: E731
                               argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grad(ours), grad(jax_xla)):
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=tol, rtol=tol)


# --- loss and gradients -----------------------------------------------------------------

def test_loss_matches_reference(tiny, run_tiny):
    graphdef, params = tiny
    (loss, logits), _ = run_tiny(params, TOKENS)
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, np.asarray(TOKENS[:, 1:])[..., None], -1).mean()
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # At init the prediction is near uniform over the real (unpadded) vocabulary.
    assert float(loss) == pytest.approx(math.log(TINY.vocab_size), abs=0.15)
    # The public loss function and the module method agree with it.
    assert float(jax.jit(make_loss_fn(graphdef))(params, TOKENS)) == pytest.approx(
        float(loss), rel=1e-6)
    method = jax.eval_shape(lambda p, t: nnx.merge(graphdef, p).loss(t), params, TOKENS)
    assert method.shape == () and method.dtype == jnp.float32


def test_next_token_loss_upcasts_bf16():
    logits = jnp.zeros((1, 2, 4), jnp.bfloat16)
    loss = next_token_loss(logits, jnp.array([[0, 3]]))
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(math.log(4), rel=1e-6)
    with pytest.raises(ValueError, match="B, L\\+1"):
        split_inputs_targets(jnp.zeros((4,), jnp.int32))
    inputs, targets = split_inputs_targets(jnp.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(inputs, [[0, 1], [3, 4]])
    np.testing.assert_array_equal(targets, [[1, 2], [4, 5]])


def test_grads_have_readable_paths_and_train(tiny, run_tiny):
    _, params = tiny
    _, grads = run_tiny(params, TOKENS)
    assert _paths(grads) == _paths(params)
    assert "blocks/attn/qkv/kernel" in _paths(grads) and "wpe" in _paths(grads)
    losses = []
    for _ in range(6):  # plain SGD on one batch must fit it
        (loss, _), grads = run_tiny(params, TOKENS)
        params = jax.tree.map(lambda p, g: p - 1.0 * g, params, grads)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


def _variant_matches_tiny(run_tiny, params, **overrides):
    """Compiles TINY with the overrides, asserts the same loss, logits and grads; returns its runner."""
    graphdef, _ = abstract_params(dataclasses.replace(TINY, **overrides))
    run_variant = _loss_logits_grads_fn(graphdef)
    (loss_a, logits_a), grads_a = run_tiny(params, TOKENS)
    (loss_b, logits_b), grads_b = run_variant(params, TOKENS)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    np.testing.assert_allclose(logits_b, logits_a, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7), grads_a, grads_b)
    return run_variant


@pytest.mark.parametrize("policy", ["dots", "full", True])
def test_remat_gives_identical_logits_and_grads(tiny, run_tiny, policy):
    _, params = tiny
    run_remat = _variant_matches_tiny(run_tiny, params, remat=policy)
    # ...and remat really is in the traced program, and absent without it.
    def has_remat(run):
        jaxpr = str(jax.make_jaxpr(run)(params, TOKENS))
        return "remat" in jaxpr or "checkpoint" in jaxpr
    assert has_remat(run_remat) and not has_remat(run_tiny)


def test_unrolled_layers_give_identical_logits_and_grads(tiny, run_tiny):
    _, params = tiny
    run_unrolled = _variant_matches_tiny(run_tiny, params, unroll_layers=True)
    # ...and the layers really are traced one by one: no loop left in the program.
    def has_loop(run):
        return "while" in run.lower(params, TOKENS).as_text()
    assert has_loop(run_tiny) and not has_loop(run_unrolled)


def test_bf16_compute_is_close_to_fp32(tiny, run_tiny):
    _, params = tiny
    bf16_graphdef, _ = abstract_params(dataclasses.replace(TINY, compute_dtype="bfloat16"))
    apply16 = jax.jit(make_apply(bf16_graphdef))
    (loss32, logits32), _ = run_tiny(params, TOKENS)
    logits16 = apply16(params, TOKENS[:, :-1])
    assert logits16.dtype == jnp.float32
    V = TINY.vocab_size
    diff = float(jnp.abs(logits16[..., :V] - logits32[..., :V]).max())
    assert 0 < diff < 0.02, diff  # bf16 really is used, and stays close
    loss16 = next_token_loss(logits16, TOKENS[:, 1:])
    assert float(loss16) == pytest.approx(float(loss32), abs=5e-3)
    assert "bf16" in str(jax.make_jaxpr(apply16)(params, TOKENS[:, :-1]))


def test_a_bfloat16_residual_stream_tracks_the_float32_one(tiny, run_tiny):
    _, params = tiny
    graphdef, _ = abstract_params(dataclasses.replace(TINY, residual_dtype="bfloat16"))
    (loss_a, _), _ = run_tiny(params, TOKENS)
    (loss_b, _), _ = _loss_logits_grads_fn(graphdef)(params, TOKENS)
    assert loss_b != loss_a and abs(float(loss_b) - float(loss_a)) < 1e-2 * float(loss_a)
