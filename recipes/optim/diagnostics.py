"""Per-step optimizer diagnostics: a few reductions, cheap enough to log every N steps.

For each branch b (and "all"), with u the applied update, g the gradient and p
the parameters before the step:

  update_rms/b          sqrt(mean(u^2)): the step size actually taken.
  update_param_ratio/b  ||u|| / ||p||: relative change of the weights.
  update_grad_cos/b     cos(u, -g): 1 is plain gradient descent, 0 orthogonal to it.

Pure jax.numpy; call it inside the jitted train step. ``labels`` (strings,
shaped like the parameters, e.g. recipes.optim.optimizers.param_labels) is static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_TINY = 1e-30  # keeps ratios finite when a branch's update is zero (e.g. at a warmup's first step, taken at LR 0)


def _sums(g, u, p):
    g, u, p = (x.astype(jnp.float32) for x in (g, u, p))
    return jnp.stack([jnp.sum(u * u), jnp.sum(p * p), jnp.sum(g * g), jnp.sum(u * g)])


def optimizer_diagnostics(grads, updates, params, labels) -> dict[str, jax.Array]:
    """Scalars keyed "<metric>/<branch>"; see the module docstring."""
    label_leaves = jax.tree.leaves(labels)
    grad_leaves, update_leaves, param_leaves = (jax.tree.leaves(t) for t in (grads, updates, params))
    counts = {len(label_leaves), len(grad_leaves), len(update_leaves), len(param_leaves)}
    if len(counts) != 1:
        raise ValueError(
            f"labels, grads, updates and params have {len(label_leaves)}, {len(grad_leaves)}, "
            f"{len(update_leaves)} and {len(param_leaves)} leaves: pass trees of the same structure "
            "(labels from recipes.optim.optimizers.param_labels(config, params))"
        )
    if not label_leaves:
        raise ValueError("optimizer_diagnostics got empty trees: pass the model's grads, updates, params and labels")
    totals: dict[str, list] = {}
    for label, g, u, p in zip(label_leaves, grad_leaves, update_leaves, param_leaves):
        entry = totals.setdefault(str(label), [jnp.zeros(4, jnp.float32), 0])
        entry[0] = entry[0] + _sums(g, u, p)
        entry[1] += u.size
    totals["all"] = [sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())]

    out = {}
    for branch, ((uu, pp, gg, ug), count) in totals.items():
        out[f"update_rms/{branch}"] = jnp.sqrt(uu / max(count, 1))
        out[f"update_param_ratio/{branch}"] = jnp.sqrt(uu) / jnp.maximum(jnp.sqrt(pp), _TINY)
        out[f"update_grad_cos/{branch}"] = -ug / jnp.maximum(jnp.sqrt(uu) * jnp.sqrt(gg), _TINY)
    return out
