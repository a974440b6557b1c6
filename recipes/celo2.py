"""Celo2, the learned per-element update rule, as an optax transformation.

The arithmetic is the released reference's (Moudgil, Knyazev, Belilovsky,
ICLR 2026), feature order included, so the published ``theta.state`` weights
apply unchanged. The difference is cost: the reference stacks 30 input
channels per parameter element and runs the MLP on that tensor. Here the
per-channel input normalization is folded into the first layer's weights, the
twelve channels that are row or column broadcasts are folded into per-row and
per-column biases, and the MLP is written as elementwise arithmetic that XLA
fuses into a few loops, so no per-element feature tensor is ever stored.

Usage (the caller scales by the learning rate)::

    theta = load_checkpoint("hf://amoudgl/celo2")
    tx = optax.chain(scale_by_celo2(theta), optax.add_decayed_weights(wd),
                     optax.scale_by_learning_rate(lr))
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from recipes.celo2_theta import (  # noqa: F401  (re-exported: one import for users)
    init_theta,
    load_checkpoint,
    normalized_momentum_theta,
    save_checkpoint,
    validate_theta,
)

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
SECOND_MOMENT_DECAY = 0.95
FACTORED_DECAYS = (0.9, 0.99, 0.999)
GRAD_CLIP = 1000.0
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
HIDDEN = 8


class Celo2TensorState(NamedTuple):
    """Statistics of one parameter tensor; every array is float32.

    ``row`` and ``col`` are the factored second-moment statistics of matrices:
    ``row`` averages over the larger matrix axis (so it lives along the
    smaller one), ``col`` over the smaller. ``full`` is the unfactored
    statistic of vectors. Unused fields are empty tuples.
    """

    momentum: tuple  # 3 arrays shaped like the parameter, decays MOMENTUM_DECAYS
    second_moment: jax.Array
    row: tuple
    col: tuple
    full: tuple


class Celo2State(NamedTuple):
    count: jax.Array
    tensors: Any  # a tree like the parameters with a Celo2TensorState per leaf


BatchAxes = Callable[[tuple, tuple], int]


def _default_batch_axes(path: tuple, shape: tuple) -> int:
    """Rank >= 3 tensors are stacks of their trailing matrices."""
    del path
    return max(len(shape) - 2, 0)


def _core_shape(shape: tuple, n_batch: int) -> tuple:
    """Shape with a scalar core promoted to a length-1 vector, as the reference does."""
    core = tuple(shape[n_batch:])
    if len(core) > 2:
        raise ValueError(
            f"Celo2 treats a tensor as a stack of vectors or matrices, but shape {shape} with "
            f"{n_batch} batch axes leaves a core of rank {len(core)}; give it at least "
            f"{len(shape) - 2} batch axes."
        )
    return tuple(shape[:n_batch]) + (core or (1,))


def _is_matrix(core_shape: tuple, n_batch: int) -> bool:
    return len(core_shape) - n_batch == 2


def _matrix_axes(core_shape: tuple) -> tuple[int, int]:
    """(small, large) trailing axes: the spec's d1 and d0 (ties go to the later axis)."""
    rows, cols = core_shape[-2:]
    return (-2, -1) if rows <= cols else (-1, -2)


def _zeros(shape) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)


def _init_tensor(shape: tuple, n_batch: int) -> Celo2TensorState:
    core = _core_shape(shape, n_batch)
    momentum = tuple(_zeros(core) for _ in MOMENTUM_DECAYS)
    if _is_matrix(core, n_batch):
        small, large = _matrix_axes(core)
        row_shape = core[:-2] + (core[small],)
        col_shape = core[:-2] + (core[large],)
        row = tuple(_zeros(row_shape) for _ in FACTORED_DECAYS)
        col = tuple(_zeros(col_shape) for _ in FACTORED_DECAYS)
        return Celo2TensorState(momentum, _zeros(core), row, col, ())
    full = tuple(_zeros(core) for _ in FACTORED_DECAYS)
    return Celo2TensorState(momentum, _zeros(core), (), (), full)


def _ema(old, new, decay):
    return decay * old + (1.0 - decay) * new


def _safe_rsqrt(x):
    return jax.lax.rsqrt(jnp.maximum(x, 1e-9))


def _rms_scale(x, axes):
    """Per-matrix (or per-vector) factor that brings x to RMS 1, as in the reference."""
    return jax.lax.rsqrt(jnp.mean(x * x, axis=axes, keepdims=True) + 1e-9)


def _newton_schulz(x):
    """Approximate orthogonalization of each trailing matrix (Muon's quintic iteration)."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    norm = jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))
    x = x / (norm + 1e-8)
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    return x


def _mlp_direction(theta, elementwise, broadcast_terms, norm_axes):
    """Channel 0 of the MLP for every element, without stacking the channels.

    elementwise: list of (feature array, first-layer weight row of shape (HIDDEN,)).
    broadcast_terms: arrays of shape (..., HIDDEN) broadcastable to the elements'
      shape plus a trailing hidden axis, already normalized and multiplied by
      their weights (the row/column channels).
    """
    w = theta["ff_mod_stack"]["~"]
    pre = [None] * HIDDEN
    for feature, weights in elementwise:
        scale = _rms_scale(feature, norm_axes)
        for j in range(HIDDEN):
            term = feature * (scale * weights[j])
            pre[j] = term if pre[j] is None else pre[j] + term
    for j in range(HIDDEN):
        pre[j] = pre[j] + w["b0"][j]
        for bias in broadcast_terms:
            pre[j] = pre[j] + bias[..., j]
    h1 = [jax.nn.relu(x) for x in pre]
    direction = w["b2"][0]
    for k in range(HIDDEN):
        h2 = w["b1"][k]
        for j in range(HIDDEN):
            h2 = h2 + h1[j] * w["w1"][j, k]
        direction = direction + jax.nn.relu(h2) * w["w2"][k, 0]
    return direction


def _split_rows(weight):
    """A (channels, HIDDEN) first-layer block as a list of per-channel rows."""
    return [weight[i] for i in range(weight.shape[0])]


def _tensor_step(theta, grad, param, stats: Celo2TensorState, n_batch: int, orthogonalize: bool):
    w = theta["ff_mod_stack"]["~"]
    shape = grad.shape
    core = _core_shape(shape, n_batch)
    g = jnp.clip(grad.astype(jnp.float32).reshape(core), -GRAD_CLIP, GRAD_CLIP)
    p = param.astype(jnp.float32).reshape(core)
    g2 = g * g + 1e-30

    momentum = tuple(_ema(m, g, b) for m, b in zip(stats.momentum, MOMENTUM_DECAYS))
    second_moment = _ema(stats.second_moment, g * g, SECOND_MOMENT_DECAY)
    rsqrt_v = jax.lax.rsqrt(second_moment + 1e-8)

    # Channels 0-8, shared by vectors and matrices (the fac_g channels differ).
    elementwise = [(g, w["w0__0"][0]), (jnp.clip(g, -0.1, 0.1), w["w0__1"][0]), (p, w["w0__2"][0])]
    elementwise += list(zip(momentum, _split_rows(w["w0__3"])))
    elementwise += [(second_moment, w["w0__4"][0])]
    elementwise += list(zip([m * rsqrt_v for m in momentum], _split_rows(w["w0__5"])))
    elementwise += [(rsqrt_v, w["w0__6"][0])]

    broadcast_terms = []
    if _is_matrix(core, n_batch):
        norm_axes = (-2, -1)
        small, large = _matrix_axes(core)

        def along_small(vec):  # a statistic indexed by the small axis, spread over the large one
            return jnp.expand_dims(vec, large)

        def along_large(vec):
            return jnp.expand_dims(vec, small)

        row = tuple(_ema(r, jnp.mean(g2, axis=large), f) for r, f in zip(stats.row, FACTORED_DECAYS))
        col = tuple(_ema(c, jnp.mean(g2, axis=small), f) for c, f in zip(stats.col, FACTORED_DECAYS))
        row_factor = [_safe_rsqrt(r / (jnp.mean(r, axis=-1, keepdims=True) + 1e-9)) for r in row]
        col_factor = [_safe_rsqrt(c) for c in col]
        adafactor = [along_small(rf) * along_large(cf) for rf, cf in zip(row_factor, col_factor)]
        elementwise += list(zip([g * a for a in adafactor], _split_rows(w["w0__7"])))
        elementwise += [(g * rsqrt_v, w["w0__8"][0])]
        elementwise += list(zip([m * a for m, a in zip(momentum, adafactor)], _split_rows(w["w0__13"])))

        # Channels 9-12 are constant along one axis: their normalized contribution to the
        # first layer is a per-row or per-column vector of HIDDEN values.
        def folded(vectors, weight):
            total = 0.0
            for vec, weights in zip(vectors, _split_rows(weight)):
                scale = _rms_scale(vec, (-1,))  # mean over the matrix = mean over this axis
                total = total + (vec * scale)[..., None] * weights
            return total

        row_bias = folded(row, w["w0__9"]) + folded([jax.lax.rsqrt(r + 1e-8) for r in row], w["w0__11"])
        col_bias = folded(col, w["w0__10"]) + folded([jax.lax.rsqrt(c + 1e-8) for c in col], w["w0__12"])
        hidden_axis_small = small - 1  # position of the small axis once a hidden axis is appended
        hidden_axis_large = large - 1
        broadcast_terms = [jnp.expand_dims(row_bias, hidden_axis_large), jnp.expand_dims(col_bias, hidden_axis_small)]
        new_stats = Celo2TensorState(momentum, second_moment, row, col, ())
    else:
        norm_axes = (-1,)
        full = tuple(_ema(u, g2, f) for u, f in zip(stats.full, FACTORED_DECAYS))
        elementwise += list(zip([g * _safe_rsqrt(u + 1e-9) for u in full], _split_rows(w["w0__7"])))
        elementwise += [(g * rsqrt_v, w["w0__8"][0])]
        new_stats = Celo2TensorState(momentum, second_moment, (), (), full)

    direction = _mlp_direction(theta, elementwise, broadcast_terms, norm_axes)
    if orthogonalize and _is_matrix(core, n_batch):
        direction = _newton_schulz(direction)
    step = direction * _rms_scale(direction, norm_axes)
    return step.reshape(shape).astype(grad.dtype), new_stats


def scale_by_celo2(
    theta,
    orthogonalize: bool = True,
    batch_axes: BatchAxes | None = None,
) -> optax.GradientTransformation:
    """Celo2's normalized step (RMS 1 per matrix or vector); scale it by the learning rate.

    Args:
      theta: the MLP weights in the official nested-dict structure
        (``load_checkpoint``, ``init_theta`` or ``normalized_momentum_theta``).
      orthogonalize: Newton-Schulz orthogonalization of matrix steps (Celo2);
        False gives Celo2-base.
      batch_axes: ``fn(path, shape) -> int``, how many leading axes of a
        parameter index independent tensors (for example layer-stacked biases
        of shape (n_layer, d) have 1). The default treats rank >= 3 tensors as
        stacks of their trailing matrices and anything else as one tensor.
    """
    theta = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), validate_theta(theta))
    batch_axes = batch_axes or _default_batch_axes

    def n_batch_of(path, leaf) -> int:
        n = int(batch_axes(path, tuple(leaf.shape)))
        if not 0 <= n <= leaf.ndim:
            raise ValueError(f"batch_axes gave {n} for parameter {jax.tree_util.keystr(path)} of shape {leaf.shape}")
        return n

    def init_fn(params):
        tensors = jax.tree_util.tree_map_with_path(lambda path, p: _init_tensor(tuple(p.shape), n_batch_of(path, p)), params)
        return Celo2State(count=jnp.zeros([], jnp.int32), tensors=tensors)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_celo2 needs the parameters: call tx.update(grads, state, params).")

        def one(path, grad, stats, param):
            return _tensor_step(theta, grad, param, stats, n_batch_of(path, grad), orthogonalize)

        results = jax.tree_util.tree_map_with_path(one, updates, state.tensors, params)
        steps = jax.tree.map(lambda _, result: result[0], updates, results)
        tensors = jax.tree.map(lambda _, result: result[1], updates, results)
        return steps, Celo2State(count=optax.safe_increment(state.count), tensors=tensors)

    return optax.GradientTransformation(init_fn, update_fn)
