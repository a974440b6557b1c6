"""Parameter-holding building blocks: dense layers and LayerNorm.

Each takes a `stack` shape that is prepended to its parameters, so one module can
hold the weights of all scanned layers; its __call__ then runs on one slice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(value: jax.Array, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    """A float32 parameter annotated with logical axis names.

    Placement happens in model.sharding, so Flax's eager sharding (which would need a
    mesh at construction time) is turned off.
    """
    if value.ndim != len(logical_axes):
        raise ValueError(f"logical axes {logical_axes} do not match shape {value.shape}")
    return nnx.Param(value.astype(jnp.float32), out_sharding=logical_axes, eager_sharding=False)


class Dense(nnx.Module):
    """y = x @ kernel + bias with kernel (fan_in, fan_out), the layout HF's Conv1D uses."""

    def __init__(self, fan_in: int, fan_out: int, *, axes: tuple[str, str], bias: bool,
                 init_std: float, rngs: nnx.Rngs, stack: tuple[int, ...] = (),
                 stack_axes: tuple[str, ...] = ()):
        init = jax.nn.initializers.normal(init_std)
        self.kernel = param(init(rngs.params(), (*stack, fan_in, fan_out), jnp.float32),
                            (*stack_axes, *axes))
        self.bias = (param(jnp.zeros((*stack, fan_out)), (*stack_axes, axes[1]))
                     if bias else None)

    def __call__(self, x_BxLxI: jax.Array) -> jax.Array:
        dtype = x_BxLxI.dtype
        B, L, I = x_BxLxI.shape
        # As one (B*L, I) x (I, O) matmul: XLA:CPU runs the 3-d einsum's backward slower.
        y_NxO = jnp.einsum("ni,io->no", x_BxLxI.reshape(B * L, I), self.kernel[...].astype(dtype))
        y_BxLxO = y_NxO.reshape(B, L, -1)
        if self.bias is not None:
            y_BxLxO = y_BxLxO + self.bias[...].astype(dtype)
        return y_BxLxO


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis. Statistics in float32; output in `out_dtype`."""

    def __init__(self, d: int, *, bias: bool, eps: float, stack: tuple[int, ...] = (),
                 stack_axes: tuple[str, ...] = ()):
        self.eps = eps
        self.scale = param(jnp.ones((*stack, d)), (*stack_axes, "embed"))
        self.bias = param(jnp.zeros((*stack, d)), (*stack_axes, "embed")) if bias else None

    def __call__(self, x_BxLxD: jax.Array, out_dtype) -> jax.Array:
        x_BxLxD = x_BxLxD.astype(jnp.float32)
        mean_BxLx1 = jnp.mean(x_BxLxD, axis=-1, keepdims=True)
        var_BxLx1 = jnp.mean(jnp.square(x_BxLxD - mean_BxLx1), axis=-1, keepdims=True)
        y_BxLxD = (x_BxLxD - mean_BxLx1) * jax.lax.rsqrt(var_BxLx1 + self.eps)
        y_BxLxD = y_BxLxD * self.scale[...]
        if self.bias is not None:
            y_BxLxD = y_BxLxD + self.bias[...]
        return y_BxLxD.astype(out_dtype)
