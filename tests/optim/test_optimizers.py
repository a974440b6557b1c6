"""The optimizer harness against hand-composed optax transformations.

Celo2 compiles are the slow part, so its tests use a small GPT-shaped tree:
the token table, one stacked MLP layer (kernel and bias) and the final
LayerNorm scale.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recipes.optim.celo2 import scale_by_celo2
from recipes.optim.theta import init_theta, normalized_momentum_theta, resolve_theta
from recipes.optim.config import OptimizerConfig, ScheduleConfig
from recipes.optim.optimizers import build_optimizer, peak_rates
from tests.optim.param_trees import L, D, V, assert_trees_close, flat, random_tree

THETA = normalized_momentum_theta()

SMALL = {"wte": (V, D), "blocks": {"mlp": {"fc": {"kernel": (L, D, 2 * D), "bias": (L, 2 * D)}}}, "ln_f": {"scale": (D,)}}
LAYER = {"blocks": SMALL["blocks"]}  # only the stacked layer: the cheapest celo2_base compiles
CONSTANT = ScheduleConfig(kind="constant")
COSINE = ScheduleConfig(kind="cosine", warmup_steps=1, total_steps=4, min_lr_ratio=0.1)


def config(name, **kwargs):
    return OptimizerConfig(name=name, theta="normalized_momentum", **kwargs)


def run(tx, params, grads_list, jit=True):
    """Updates of successive steps (params move with the updates)."""
    update = jax.jit(tx.update) if jit else tx.update
    state, updates = tx.init(params), []
    for grads in grads_list:
        u, state = update(grads, state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
    return updates


def kernel(tree):
    return tree["blocks"]["mlp"]["fc"]["kernel"]


@pytest.mark.parametrize("name", ["celo2", "muon", "adamw", "celo2_base"])
def test_updates_at_peak_one_scaled_by_peak_rates_are_the_updates_at_those_peaks(name):
    """What lets one compiled program train every point of a learning-rate grid (metatrain.evaluate)."""
    params = random_tree(SMALL, seed=0)
    grads = [random_tree(SMALL, seed=s) for s in (1, 2, 3)]
    lr, side_lr = 0.01, 0.03
    settings = dict(weight_decay=0.1, schedule=COSINE, muon={"consistent_rms": 0.2})
    at_peaks, _ = build_optimizer(config(name, lr=lr, adamw_lr_mult=side_lr / lr, **settings), params)
    unit_config = config(name, lr=1.0, **settings)
    unit, _ = build_optimizer(unit_config, params)
    peaks = peak_rates(unit_config, params, lr, side_lr)
    scale = optax.GradientTransformation(lambda p: optax.EmptyState(),
                                         lambda u, s, p=None: (jax.tree.map(jnp.multiply, u, peaks), s))
    for want, got in zip(run(at_peaks, params, grads), run(optax.chain(unit, scale), params, grads)):
        assert_trees_close(got, want, atol=1e-9)


def test_decoupled_weight_decay_in_both_branches():
    lr, wd = 0.02, 0.1
    params = random_tree(SMALL, seed=0)
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["blocks"]["mlp"]["fc"]["kernel"] = random_tree(SMALL, seed=1)["blocks"]["mlp"]["fc"]["kernel"]
    tx, _ = build_optimizer(config("celo2", lr=lr, weight_decay=wd, adamw_lr_mult=0.5, schedule=CONSTANT), params)
    (update,) = run(tx, params, [grads])

    # Celo2 branch: -lr * (celo2_step + wd * p).
    raw = scale_by_celo2(THETA, orthogonalize=True)
    step, _ = jax.jit(raw.update)({"k": kernel(grads)}, raw.init({"k": kernel(params)}), {"k": kernel(params)})
    np.testing.assert_allclose(kernel(update), -lr * (step["k"] + wd * kernel(params)), rtol=1e-5, atol=1e-7)
    assert float(jnp.sqrt(jnp.mean(step["k"][0] ** 2))) == pytest.approx(1.0, rel=1e-3)  # RMS 1 per matrix

    # AdamW branch with zero gradient: the weight shrinks by exactly lr_adamw * wd.
    lr_adamw = 0.5 * lr
    new = optax.apply_updates(params, update)
    for path in ("wte", "blocks/mlp/fc/bias", "ln_f/scale"):
        np.testing.assert_allclose(flat(new)[path], flat(params)[path] * (1 - lr_adamw * wd), rtol=1e-6, err_msg=path)


def test_adamw_side_learning_rate_multiplier_and_override():
    params, grads = random_tree(SMALL, seed=0), random_tree(SMALL, seed=1)
    lr = 0.02

    def first_update(**kwargs):
        tx, _ = build_optimizer(config("muon", lr=lr, weight_decay=0.0, schedule=CONSTANT, **kwargs), params)
        return flat(run(tx, params, [grads])[0])

    full, quarter, own = first_update(adamw_lr_mult=1.0), first_update(adamw_lr_mult=0.25), first_update(adamw_lr=7e-4)
    for path in ("wte", "blocks/mlp/fc/bias", "ln_f/scale"):
        # Adam's bias-corrected first step is -lr * g / (|g| + eps): the sign of g times the side LR.
        g = flat(grads)[path]
        np.testing.assert_allclose(full[path], -lr * g / (jnp.abs(g) + 1e-8), rtol=1e-5, err_msg=path)
        np.testing.assert_allclose(quarter[path], 0.25 * full[path], rtol=1e-6, err_msg=path)
        np.testing.assert_allclose(own[path], 7e-4 / lr * full[path], rtol=1e-6, err_msg=path)
    main = "blocks/mlp/fc/kernel"
    np.testing.assert_array_equal(quarter[main], full[main])  # the main branch keeps lr


def test_celo2_harness_equals_hand_composition():
    lr, wd, clip = 0.02, 0.1, 0.5
    params = random_tree(SMALL, seed=0)
    grads = [random_tree(SMALL, seed=s, scale=3.0) for s in (1, 2)]
    cfg = config("celo2", lr=lr, weight_decay=wd, adamw_lr_mult=0.3, grad_clip_norm=clip, schedule=COSINE)
    tx, _ = build_optimizer(cfg, params)

    # optax's own warmup-cosine counts decay_steps from step 0, warmup included.
    sched = lambda peak: optax.warmup_cosine_decay_schedule(0.0, peak, 1, 4, end_value=0.1 * peak)  # noqa: E731
    labels = {"wte": "adamw", "blocks": {"mlp": {"fc": {"kernel": "celo2", "bias": "adamw"}}}, "ln_f": {"scale": "adamw"}}
    hand = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.partition({
            "celo2": optax.chain(scale_by_celo2(THETA, orthogonalize=True), optax.add_decayed_weights(wd),
                                 optax.scale_by_learning_rate(sched(lr))),
            "adamw": optax.adamw(sched(0.3 * lr), b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd),
        }, labels),
    )
    for got, want in zip(run(tx, params, grads), run(hand, params, grads)):
        assert_trees_close(got, want)


def unstack(tree):
    """The stacked layer of a LAYER tree split into per-layer entries l0, l1, ..."""
    fc = tree["blocks"]["mlp"]["fc"]
    return {f"l{i}": {"kernel": fc["kernel"][i], "bias": fc["bias"][i]} for i in range(L)}


def test_celo2_base_treats_stacked_layers_like_the_unstacked_reference():
    lr, wd = 0.01, 0.1
    params = random_tree(LAYER, seed=0)
    grads = [random_tree(LAYER, seed=s) for s in (1, 2)]
    tx, table = build_optimizer(config("celo2_base", lr=lr, weight_decay=wd, schedule=CONSTANT), params)
    assert {r.branch for r in table.rows} == {"celo2_base"}
    # The reference sees each layer's (fan_in, fan_out) kernel as a matrix and its bias as a vector.
    reference = optax.chain(scale_by_celo2(THETA, orthogonalize=False), optax.add_decayed_weights(wd),
                            optax.scale_by_learning_rate(lr))
    got = run(tx, params, grads)
    want = run(reference, unstack(params), [unstack(g) for g in grads])
    for g, w in zip(got, want):
        assert_trees_close(unstack(g), w)


def test_muon_orthogonalizes_each_layer_separately():
    lr, wd = 0.02, 0.1
    params = random_tree(SMALL, seed=0)
    grads = [random_tree(SMALL, seed=s) for s in (1, 2)]
    tx, _ = build_optimizer(config("muon", lr=lr, weight_decay=wd, schedule=CONSTANT), params)
    got = run(tx, params, grads)
    layers = lambda t: {f"l{i}": kernel(t)[i] for i in range(L)}  # noqa: E731
    reference = optax.contrib.muon(lr, weight_decay=wd)  # 2-D matrices, one per layer
    want = run(reference, layers(params), [layers(g) for g in grads])
    for g, w in zip(got, want):
        assert_trees_close(layers(g), w)
    # Orthogonalized per layer: without the decay term, each layer's step has near-equal singular values.
    for i in range(L):
        s = jnp.linalg.svd(kernel(got[0])[i] + lr * wd * kernel(params)[i], compute_uv=False)
        assert float(s.min() / s.max()) > 0.5


def test_adamw_baseline_equals_optax_adamw_with_rank1_exemption_and_clipping():
    lr, wd, clip = 0.01, 0.1, 0.1
    params = random_tree(SMALL, seed=0)
    grads = [random_tree(SMALL, seed=1, scale=10.0), random_tree(SMALL, seed=2, scale=0.01)]
    cfg = config("adamw", lr=lr, weight_decay=wd, decay_rank1=False, grad_clip_norm=clip, schedule=COSINE)
    tx, _ = build_optimizer(cfg, params)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, 1, 4, end_value=0.1 * lr)
    # nanoGPT convention: only logical rank >= 2 (the embedding and the layer-stacked kernel) decays.
    mask = {p: p in ("wte", "blocks/mlp/fc/kernel") for p in flat(params)}
    mask_tree = jax.tree_util.tree_map_with_path(lambda kp, _: mask["/".join(k.key for k in kp)], params)
    adamw = optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd, mask=mask_tree)
    got = run(tx, params, grads)
    for g, w in zip(got, run(optax.chain(optax.clip_by_global_norm(clip), adamw), params, grads)):
        assert_trees_close(g, w)
    # The clipping matters here (the two steps' gradients differ 1000x in scale).
    unclipped = run(adamw, params, grads)
    assert not np.allclose(flat(got[1])["wte"], flat(unclipped[1])["wte"], rtol=1e-3)


@pytest.mark.parametrize("name", ["celo2_base", "muon"])
def test_abstract_and_nnx_state_params(name):
    params = random_tree(LAYER, seed=0)
    grads = random_tree(LAYER, seed=1)
    as_state = lambda t: nnx.State(jax.tree.map(nnx.Param, t))  # noqa: E731
    state_params, state_grads = as_state(params), as_state(grads)
    cfg = config(name, lr=0.01, schedule=CONSTANT)
    # Built from shapes only (as a dry run does), then used on concrete nnx.State trees.
    abstract = jax.eval_shape(lambda: state_params)
    tx, table = build_optimizer(cfg, abstract)
    opt_shapes = jax.eval_shape(tx.init, abstract)
    # The table counts every array that grows with the parameters; what it leaves out are the step
    # counters and the method's constants: a few bytes, whatever the parameter count.
    untabled = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_shapes)) - sum(r.state_bytes for r in table.rows)
    assert 0 <= untabled <= 64, untabled
    (got,) = run(tx, state_params, [state_grads])
    assert isinstance(got, nnx.State)
    plain_tx, _ = build_optimizer(cfg, params)
    (want,) = run(plain_tx, params, [grads])
    assert_trees_close(nnx.to_pure_dict(got), want)


def test_theta_sources():
    def theta_of(config: OptimizerConfig):  # as build_optimizer resolves it
        return resolve_theta(config.theta, config.theta_seed, setting="optimizer.theta")

    np.testing.assert_array_equal(theta_of(config("celo2"))["ff_mod_stack"]["~"]["w2"],
                                  THETA["ff_mod_stack"]["~"]["w2"])
    # "random" draws init_theta from theta_seed: the same seed gives the same theta.
    drawn = theta_of(OptimizerConfig(theta="random", theta_seed=3))["ff_mod_stack"]["~"]
    expected = init_theta(jax.random.key(3))["ff_mod_stack"]["~"]
    other = theta_of(OptimizerConfig(theta="random", theta_seed=4))["ff_mod_stack"]["~"]
    np.testing.assert_array_equal(drawn["w1"], expected["w1"])
    assert not np.array_equal(drawn["w1"], other["w1"])
    with pytest.raises(FileNotFoundError, match="optimizer.theta='/nonexistent/theta.state' could not be loaded"):
        theta_of(OptimizerConfig(theta="/nonexistent/theta.state"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="sgd"), "optimizer.name must be one of ['celo2', 'celo2_base', 'muon', 'adamw'], got 'sgd'"),
    (dict(lr=-1e-3), "optimizer.lr must be a number >= 0, got -0.001"),
    (dict(adamw_lr=-1.0), "optimizer.adamw_lr must be a number >= 0 or null, got -1.0"),
    (dict(weight_decay=float("nan")), "optimizer.weight_decay must be a number >= 0, got nan"),
    (dict(b2=1.0), "optimizer.b2 must be a number in [0, 1), got 1.0"),
    (dict(grad_clip_norm=0.0), "optimizer.grad_clip_norm must be a number > 0 or null, got 0.0; null is no clipping"),
    (dict(schedule={"kind": "exp"}), "schedule.kind must be one of ['cosine', 'linear', 'constant', 'wsd'], got 'exp'"),
    (dict(schedule={"warmup": 10}), "unknown config key 'optimizer.schedule.warmup'; did you mean 'optimizer.schedule.warmup_steps'?"),
    (dict(muon={"ns_steps": 0}), "muon.ns_steps must be an int >= 1"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        OptimizerConfig(**kwargs)


def test_from_dict_and_missing_run_length():
    cfg = OptimizerConfig.from_dict({"name": "muon", "lr": 3e-3, "schedule": {"kind": "wsd", "warmup_steps": 2},
                                     "muon": {"beta": 0.9}})
    assert (cfg.lr, cfg.schedule.kind, cfg.muon.beta, cfg.side_lr) == (3e-3, "wsd", 0.9, 3e-3)
    assert OptimizerConfig.from_dict(cfg.to_dict()) == cfg
    # Run configs saved when accumulation had a second, optimizer-side switch (left at 1) still load.
    assert OptimizerConfig.from_dict({**cfg.to_dict(), "grad_accum_steps": 1}) == cfg
    with pytest.raises(ValueError, match=re.escape("optimizer.grad_accum_steps=2 is no longer read: accumulate "
                                                   "inside one step instead")):
        OptimizerConfig.from_dict({**cfg.to_dict(), "grad_accum_steps": 2})
    with pytest.raises(ValueError, match=re.escape("unknown config key 'optimizer.learning_rate'")):
        OptimizerConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="set schedule.total_steps or pass total_steps"):
        build_optimizer(cfg, random_tree(SMALL))
    too_short = OptimizerConfig(name="adamw", schedule={"warmup_steps": 100, "total_steps": 10})
    with pytest.raises(ValueError, match="warmup_steps=100 exceeds total_steps=10"):
        build_optimizer(too_short, random_tree(SMALL))
    # Given the run length, the schedule has its shape: warmup to the peak over 2 steps, the peak held,
    # then the last 20% (2 steps) falling linearly towards min_lr_ratio (0.1) of it. A constant gradient
    # makes Adam's bias-corrected step sign(g), so the AdamW side's update is -lr_t * (sign(g) + wd * p).
    params, grads = random_tree(SMALL, seed=0), random_tree(SMALL, seed=1)
    tx, _ = build_optimizer(cfg, params, total_steps=10)
    g, p, rates = flat(grads)["ln_f/scale"], flat(params)["ln_f/scale"], []
    for update in run(tx, params, [grads] * 10):
        u = flat(update)["ln_f/scale"]
        rates.append(-u / (jnp.sign(g) + cfg.weight_decay * p))
        p = p + u
    expected = 3e-3 * np.array([0, 0.5, 1, 1, 1, 1, 1, 1, 1, 1 - 0.9 / 2])
    np.testing.assert_allclose(np.asarray(rates), np.broadcast_to(expected[:, None], (10, D)), rtol=1e-5, atol=1e-9)
