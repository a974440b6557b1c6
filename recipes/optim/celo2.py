"""Celo2, the learned per-element update rule, as an optax transformation.

The arithmetic is the released reference's (Moudgil, Knyazev, Belilovsky,
ICLR 2026), feature order included, so the published ``theta.state`` weights
apply unchanged. The difference is cost: the reference stacks 30 input
channels per parameter element and runs the MLP on that tensor. Here the
per-channel input normalization is folded into the first layer's weights, the
twelve channels that are row or column broadcasts are folded into per-row and
per-column biases, the normalization statistics come from one variadic row
reduction, and the MLP is written as elementwise arithmetic that XLA fuses
into one loop: no per-element feature tensor is ever stored. Tensors are
processed one after another, so the temporaries of one tensor at most are
alive (XLA:CPU measures 4 bytes per parameter of the largest tensor for
Celo2-base, 9-12 for Celo2; scripts/bench_optimizer.py).

Usage (the caller scales by the learning rate)::

    theta = load_checkpoint("hf://amoudgl/celo2")
    tx = optax.chain(scale_by_celo2(theta), optax.add_decayed_weights(wd),
                     optax.scale_by_learning_rate(lr))
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from recipes.optim.theta import validate_theta

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
SECOND_MOMENT_DECAY = 0.95
FACTORED_DECAYS = (0.9, 0.99, 0.999)
GRAD_CLIP = 1000.0
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
HIDDEN = 8
# Tall matrices below this many elements are processed transposed (see scale_by_celo2).
TRANSPOSE_BELOW = 65536


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
    mean_square = x * x
    for axis in sorted(axes, reverse=True):  # one axis at a time: XLA's CPU row reductions are far faster
        mean_square = jnp.mean(mean_square, axis=axis, keepdims=True)
    return jax.lax.rsqrt(mean_square + 1e-9)


def _rms_scales(features, axes):
    """_rms_scale of many same-shaped arrays in one pass over memory.

    A single variadic reduction computes every feature on the fly and keeps
    only the sums, where separate reductions would each store their input.
    """
    dims = tuple(sorted(a % features[0].ndim for a in axes))
    squares = tuple(x * x for x in features)
    zeros = tuple(jnp.zeros((), jnp.float32) for _ in squares)
    add = lambda a, b: tuple(x + y for x, y in zip(a, b))  # noqa: E731
    # Last axis first: XLA:CPU vectorizes a multi-output row reduction, but emits one over
    # every axis at once as a scalar loop (25% of a Celo2-base update on GPT-2 small).
    # The small row sums are then reduced one by one: a sharded row axis then costs an
    # all-reduce of partial sums, where the partitioner all-gathers a variadic reduction's.
    sums = jax.lax.reduce(squares, zeros, add, dims[-1:])
    sums = [jnp.sum(s, axis=dims[:-1]) for s in sums]
    count = math.prod(features[0].shape[d] for d in dims)
    return [jax.lax.rsqrt(jnp.expand_dims(s / count, dims) + 1e-9) for s in sums]


def _newton_schulz(x):
    """Approximate orthogonalization of each trailing matrix (Muon's quintic iteration).

    Each iteration is written as one product with the small polynomial
    a*I + b*A + c*A^2 of the Gram matrix A, on the left for wide matrices and
    on the right for tall ones (the reference transposes instead); the first
    iteration absorbs the Frobenius normalization. Only two matrices of x's
    size are alive at a time.
    """
    a, b, c = NEWTON_SCHULZ_COEFFS
    tall = x.shape[-2] > x.shape[-1]
    gram_spec, apply_spec = ("...ri,...rj->...ij", "...ri,...ij->...rj") if tall else ("...ir,...jr->...ij", "...jr,...ij->...ir")
    eye = jnp.eye(min(x.shape[-2:]), dtype=x.dtype)
    scale = 1.0 / (jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)) + 1e-8)
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = jnp.einsum(gram_spec, x, x) * (scale * scale)
        poly = (a * eye + b * gram + c * gram @ gram) * scale
        x = jnp.einsum(apply_spec, x, poly)
        scale = 1.0
    return x


def _mlp_direction(theta, features, weight_rows, scales, broadcast_terms):
    """Channel 0 of the MLP for every element, without stacking the channels.

    features: elementwise input channels; weight_rows: each one's first-layer
      weights, shape (HIDDEN,); scales: each one's normalization factor.
    broadcast_terms: arrays of shape (..., HIDDEN) broadcastable to the
      elements' shape plus a trailing hidden axis, already normalized and
      multiplied by their weights (the row/column channels).
    """
    w = theta["ff_mod_stack"]["~"]
    pre = [w["b0"][j] for j in range(HIDDEN)]
    for bias in broadcast_terms:
        pre = [pre[j] + bias[..., j] for j in range(HIDDEN)]
    for feature, weights, scale in zip(features, weight_rows, scales):
        pre = [pre[j] + feature * (scale * weights[j]) for j in range(HIDDEN)]
    h1 = [jax.nn.relu(x) for x in pre]
    direction = w["b2"][0]
    for k in range(HIDDEN):
        h2 = w["b1"][k]
        for j in range(HIDDEN):
            h2 = h2 + h1[j] * w["w1"][j, k]
        direction = direction + jax.nn.relu(h2) * w["w2"][k, 0]
    return direction


def _weight_rows(theta, is_matrix: bool):
    """First-layer weight rows in the order of _elementwise_features."""
    w = theta["ff_mod_stack"]["~"]
    groups = [0, 1, 2, 3, 4, 5, 6, 7, 8] + ([13] if is_matrix else [])
    return [row for i in groups for row in w[f"w0__{i}"]]


def _elementwise_features(grad, param, momentum, second_moment, factors, axes):
    """Channels 0-8 (and 13 for matrices) of the input features, one array each.

    factors: per decay, what turns g into the Adafactor-normalized gradient:
    (row factor, column factor) vectors for matrices, whose (small, large)
    axes are ``axes``; the full statistic u for vectors (``axes`` None).
    """
    if axes is None:
        adafactor = [_safe_rsqrt(u + 1e-9) for u in factors]
    else:
        small, large = axes  # a row factor lives along the small axis, constant along the large one
        adafactor = [jnp.expand_dims(rf, large) * jnp.expand_dims(cf, small) for rf, cf in factors]
    is_matrix = axes is not None
    g = jnp.clip(grad, -GRAD_CLIP, GRAD_CLIP)
    rsqrt_v = jax.lax.rsqrt(second_moment + 1e-8)
    features = [g, jnp.clip(g, -0.1, 0.1), param, *momentum, second_moment]
    features += [m * rsqrt_v for m in momentum] + [rsqrt_v]
    features += [g * a for a in adafactor] + [g * rsqrt_v]
    if is_matrix:
        features += [m * a for m, a in zip(momentum, adafactor)]
    return features


def _after(x, token):
    """x, made to depend on the scalar ``token`` without changing its value.

    XLA drops optimization barriers on CPU, so a data dependency is the way to
    make one tensor's work wait for the previous tensor's: then only one
    tensor's temporaries are ever alive. Adding a signed zero is exact.
    """
    return x + jnp.where(jnp.isfinite(token), token, 0.0) * 0.0


def _lanes_idle(shape: tuple, n_batch: int, transpose_below: int) -> bool:
    """A small tall matrix: its elementwise work vectorizes better transposed."""
    core = _core_shape(shape, n_batch)
    return _is_matrix(core, n_batch) and core[-2] > core[-1] and math.prod(core[-2:]) < transpose_below


def _transposed_step(theta, grad, param, stats: Celo2TensorState, n_batch: int, orthogonalize: bool, token):
    """_tensor_step of a matrix with its two axes swapped, and its results swapped back.

    The row and column statistics live along the small and the large axis
    whichever comes first, so they need no change.
    """
    t = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    shape = grad.shape
    core = _core_shape(shape, n_batch)
    grad, param = t(grad.reshape(core)), t(param.reshape(core))
    stats = stats._replace(momentum=tuple(t(m) for m in stats.momentum), second_moment=t(stats.second_moment))
    step, new, token = _tensor_step(theta, grad, param, stats, n_batch, orthogonalize, token)
    new = new._replace(momentum=tuple(t(m) for m in new.momentum), second_moment=t(new.second_moment))
    return t(step).reshape(shape), new, token


def _tensor_step(theta, grad, param, stats: Celo2TensorState, n_batch: int, orthogonalize: bool, token):
    """Returns (step, new statistics, a scalar that is ready once the step is)."""
    w = theta["ff_mod_stack"]["~"]
    shape, dtype = grad.shape, grad.dtype
    core = _core_shape(shape, n_batch)
    is_matrix = _is_matrix(core, n_batch)
    grad = _after(grad.astype(jnp.float32), token).reshape(core)
    param = param.astype(jnp.float32).reshape(core)
    g = jnp.clip(grad, -GRAD_CLIP, GRAD_CLIP)
    g2 = g * g + 1e-30

    momentum = tuple(_ema(m, g, b) for m, b in zip(stats.momentum, MOMENTUM_DECAYS))
    second_moment = _ema(stats.second_moment, g * g, SECOND_MOMENT_DECAY)

    broadcast_terms = []
    if is_matrix:
        norm_axes = (-2, -1)
        small, large = _matrix_axes(core)
        row = tuple(_ema(r, jnp.mean(g2, axis=large), f) for r, f in zip(stats.row, FACTORED_DECAYS))
        col = tuple(_ema(c, jnp.mean(g2, axis=small), f) for c, f in zip(stats.col, FACTORED_DECAYS))
        row_factor = [_safe_rsqrt(r / (jnp.mean(r, axis=-1, keepdims=True) + 1e-9)) for r in row]
        col_factor = [_safe_rsqrt(c) for c in col]
        factors, axes = tuple(zip(row_factor, col_factor)), (small, large)

        # Channels 9-12 are constant along one axis: their normalized contribution to the
        # first layer is a per-row or per-column vector of HIDDEN values.
        def folded(vectors, weight):
            total = 0.0
            for vec, weights in zip(vectors, weight):
                scale = _rms_scale(vec, (-1,))  # mean over the matrix = mean over this axis
                total = total + (vec * scale)[..., None] * weights
            return total

        row_bias = folded(row, w["w0__9"]) + folded([jax.lax.rsqrt(r + 1e-8) for r in row], w["w0__11"])
        col_bias = folded(col, w["w0__10"]) + folded([jax.lax.rsqrt(c + 1e-8) for c in col], w["w0__12"])
        # With a hidden axis appended, matrix axis a moves to a - 1.
        broadcast_terms = [jnp.expand_dims(row_bias, large - 1), jnp.expand_dims(col_bias, small - 1)]
        new_stats = Celo2TensorState(momentum, second_moment, row, col, ())
    else:
        norm_axes = (-1,)
        full = tuple(_ema(u, g2, f) for u, f in zip(stats.full, FACTORED_DECAYS))
        factors, axes = full, None
        new_stats = Celo2TensorState(momentum, second_moment, (), (), full)

    inputs = (grad, param, momentum, second_moment, factors)
    scales = _rms_scales(_elementwise_features(*inputs, axes), norm_axes)
    # The MLP pass recomputes the features from the stored inputs instead of keeping all
    # of them from the normalization pass: the barrier stops XLA from merging the two.
    features = _elementwise_features(*jax.lax.optimization_barrier(inputs), axes)
    direction = _mlp_direction(theta, features, _weight_rows(theta, is_matrix), scales, broadcast_terms)
    if orthogonalize and is_matrix:
        direction = _newton_schulz(direction)
    scale = _rms_scale(direction, norm_axes)
    step = direction * scale
    return step.reshape(shape).astype(dtype), new_stats, jnp.sum(scale)


def scale_by_celo2(
    theta,
    orthogonalize: bool = True,
    batch_axes: BatchAxes | None = None,
    transpose_below: int | None = None,
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
      transpose_below: a tall matrix (more rows than columns) of fewer elements
        than this is processed transposed, its long axis last, and the result
        transposed back. The rule treats both axes by size, not position, so
        the arithmetic is the same; XLA's elementwise loops run along the last
        axis, and a short one (10 classes, say) leaves vector lanes idle. 0
        never transposes; None takes ``TRANSPOSE_BELOW``.
    """
    theta = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), validate_theta(theta))
    batch_axes = batch_axes or _default_batch_axes
    transpose_below = TRANSPOSE_BELOW if transpose_below is None else transpose_below

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

        paths_and_grads, treedef = jax.tree_util.tree_flatten_with_path(updates)
        all_stats = treedef.flatten_up_to(state.tensors)
        all_params = treedef.flatten_up_to(params)
        steps, tensors, token = [], [], jnp.zeros([], jnp.float32)
        for (path, grad), stats, param in zip(paths_and_grads, all_stats, all_params):
            # One tensor after another (the token chains them), so that only one tensor's
            # temporaries are alive at a time.
            n_batch = n_batch_of(path, grad)
            if _lanes_idle(grad.shape, n_batch, transpose_below):
                step, new_stats, token = _transposed_step(theta, grad, param, stats, n_batch, orthogonalize, token)
            else:
                step, new_stats, token = _tensor_step(theta, grad, param, stats, n_batch, orthogonalize, token)
            steps.append(step)
            tensors.append(new_stats)
        new_state = Celo2State(count=optax.safe_increment(state.count), tensors=treedef.unflatten(tensors))
        return treedef.unflatten(steps), new_state

    return optax.GradientTransformation(init_fn, update_fn)
