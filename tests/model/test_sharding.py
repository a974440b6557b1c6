"""Logical->mesh sharding rules, the mesh helper, and sharded == single-device numerics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from model import (ModelConfig, abstract_params, constrain, init_params, logical_to_spec,
                   make_loss_fn, make_mesh, param_partition_specs, param_shardings)

TINY = ModelConfig.named("tiny", vocab_size=100)


def test_eight_simulated_devices():
    assert len(jax.devices()) == 8


def test_make_mesh():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(make_mesh(data=2).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(make_mesh(data=-1, fsdp=1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert dict(make_mesh(1, 1, 1, devices=jax.devices()[:1]).shape)["fsdp"] == 1
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="do not split"):
        make_mesh(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(data=2, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match="positive or -1"):
        make_mesh(data=0)


def test_logical_to_spec_rules():
    assert logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("batch", "seq", "act_embed")) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("batch", "seq", "act_mlp")) == P(("data", "fsdp"), None, "tensor")
    assert logical_to_spec((None, "embed")) == P(None, "fsdp")
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("embd",))
    with pytest.raises(ValueError, match="used twice"):
        logical_to_spec(("embed", "embed"))
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), shape=(2, 3))


def test_logical_to_spec_respects_mesh():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("batch", "seq"), (8, 5), mesh) == P(("data", "fsdp"), None)
    # A dim the mesh axes do not divide falls back to fewer axes, then to replication.
    assert logical_to_spec(("batch", "seq"), (6, 5), mesh) == P("data", None)
    assert logical_to_spec(("batch", "seq"), (3, 5), mesh) == P(None, None)
    assert logical_to_spec(("heads", "embed"), (25, 64), mesh) == P(None, "fsdp")
    # Mesh axes the mesh does not have are dropped.
    data_only = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    assert logical_to_spec(("batch", "embed"), (8, 64), data_only) == P("data", None)


def test_param_specs_at_gpt2_small():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    _, abstract = abstract_params(ModelConfig.named("gpt2_small"))
    specs = nnx.to_pure_dict(param_partition_specs(abstract, mesh))
    assert specs["wte"] == P("tensor", "fsdp")
    assert specs["wpe"] == P(None, "fsdp")
    assert specs["ln_f"]["scale"] == P("fsdp")
    blocks = specs["blocks"]
    assert blocks["attn"]["qkv"]["kernel"] == P(None, "fsdp", "tensor")
    assert blocks["attn"]["qkv"]["bias"] == P(None, "tensor")
    assert blocks["attn"]["proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert blocks["mlp"]["fc"]["kernel"] == P(None, "fsdp", "tensor")
    assert blocks["mlp"]["proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert blocks["ln_1"]["scale"] == P(None, "fsdp")
    shardings = jax.tree.leaves(param_shardings(abstract, mesh))
    assert len(shardings) == 16 and all(isinstance(s, NamedSharding) for s in shardings)


def test_constrain_is_noop_without_mesh():
    x = jnp.ones((4, 3, 8))
    assert constrain(x, ("batch", "seq", "act_embed")) is x


def test_activation_constraints_only_under_a_mesh():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, abstract = abstract_params(TINY)
    tokens = jax.ShapeDtypeStruct((8, 33), jnp.int32)
    loss_fn = jax.jit(make_loss_fn(graphdef))
    assert "sharding_constraint" not in loss_fn.lower(abstract, tokens).as_text()
    with jax.set_mesh(mesh):
        assert "sharding_constraint" in loss_fn.lower(abstract, tokens).as_text()


def test_sharded_forward_and_grad_match_single_device():
    """data=2 x fsdp=2 x tensor=2 over 8 CPU devices vs. one device, float32.

    Tolerances: loss rtol 1e-5; grads atol 1e-6 + rtol 1e-4 (observed differences
    are ~1e-6 on the loss and ~4e-8 on grads, from a different reduction order).
    """
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, params = init_params(TINY, seed=0)
    _, sharded_params = init_params(TINY, seed=0, mesh=mesh)
    tokens = jax.random.randint(jax.random.key(0), (8, 33), 0, TINY.vocab_size)

    # Sharded initialisation gives the same numbers, really spread over the mesh.
    jax.tree.map(np.testing.assert_array_equal, sharded_params, params)
    kernel = sharded_params["blocks"]["mlp"]["fc"]["kernel"][...]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 32, 128)
    assert sharded_params["wte"][...].sharding.spec == P("tensor", "fsdp")

    value_and_grad = jax.value_and_grad(make_loss_fn(graphdef))
    loss_1, grads_1 = jax.jit(value_and_grad)(params, tokens)

    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "seq"), tokens.shape, mesh))
    sharded_tokens = jax.device_put(tokens, batch_sharding)
    assert len(sharded_tokens.sharding.device_set) == 8
    shardings = param_shardings(params, mesh)
    with jax.set_mesh(mesh):
        step = jax.jit(value_and_grad, out_shardings=(NamedSharding(mesh, P()), shardings))
        loss_8, grads_8 = step(sharded_params, sharded_tokens)

    assert grads_8["blocks"]["attn"]["qkv"]["kernel"][...].sharding.spec == P(
        None, "fsdp", "tensor")
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6),
                 grads_1, grads_8)
    assert float(jnp.abs(grads_1["blocks"]["attn"]["qkv"]["kernel"][...]).max()) > 1e-3
