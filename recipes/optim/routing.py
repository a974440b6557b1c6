"""Routing of parameters to optimizer branches, and the routing table saved with a run.

A parameter is known by its path (the tree's keys joined by "/", e.g.
"blocks/attn/qkv/kernel") and its shape. Its *logical* rank excludes the
leading layer axes of stacked parameters, so a stacked bias (n_layer, d) is a
vector and a stacked kernel (n_layer, fan_in, fan_out) a matrix.

Routing only reads paths and shapes, so it works on arrays, on
jax.ShapeDtypeStruct trees from jax.eval_shape and on nnx.State alike.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

from data.files import atomic_write
from recipes.optim.config import RoutingConfig, RoutingRule

_VALUE_ATTR = "value"  # nnx.Variable leaves flatten through their .value attribute


def param_path(keypath: Sequence) -> str:
    """The "/"-joined names of a jax key path (an nnx.Variable's trailing .value dropped)."""
    names = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
        else:
            names.append(str(key))
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == _VALUE_ATTR:
        names.pop()
    return "/".join(names)


def leaf_shape(leaf) -> tuple[int, ...]:
    return tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)))


class Route(NamedTuple):
    """Where one parameter goes and why."""

    path: str
    shape: tuple[int, ...]
    stacked_axes: int  # leading layer axes, not part of the logical rank
    logical_rank: int
    group: str  # "main" (the named optimizer's matrix rule) or "adamw"
    reason: str

    @property
    def batch_axes(self) -> int:
        """Leading axes indexing independent tensors: layer axes, plus any beyond a matrix."""
        return self.stacked_axes + max(self.logical_rank - 2, 0)


def stacked_axes(path: str, shape: tuple[int, ...], routing: RoutingConfig) -> int:
    if routing.stacked_axes == 0 or not re.search(routing.stacked_pattern, path):
        return 0
    if len(shape) < routing.stacked_axes:
        raise ValueError(
            f"parameter {path} of shape {shape} matches routing.stacked_pattern {routing.stacked_pattern!r} "
            f"but has fewer than routing.stacked_axes={routing.stacked_axes} axes; narrow the pattern"
        )
    return routing.stacked_axes


def is_embedding(path: str, routing: RoutingConfig) -> bool:
    return re.search(routing.embedding_pattern, path) is not None


def rule_matches(rule: RoutingRule, path: str, shape: tuple[int, ...], rank: int) -> bool:
    if rule.pattern is not None and not re.search(rule.pattern, path):
        return False
    if rule.min_rank is not None and rank < rule.min_rank:
        return False
    if rule.max_rank is not None and rank > rule.max_rank:
        return False
    return rule.predicate is None or bool(rule.predicate(path, shape))


def describe(rule: RoutingRule) -> str:
    """'pattern='qkv' rank>=2 -> main'."""
    parts = [f"pattern={rule.pattern!r}"] if rule.pattern is not None else []
    parts += [f"rank>={rule.min_rank}"] if rule.min_rank is not None else []
    parts += [f"rank<={rule.max_rank}"] if rule.max_rank is not None else []
    parts += [f"predicate={getattr(rule.predicate, '__name__', 'fn')}"] if rule.predicate is not None else []
    return f"{' '.join(parts) or 'all'} -> {rule.group}"


def route(path: str, shape: tuple[int, ...], routing: RoutingConfig) -> Route:
    """First matching rule, else the default: embeddings and rank <= adamw_max_rank -> adamw."""
    n_stacked = stacked_axes(path, shape, routing)
    rank = len(shape) - n_stacked
    for i, rule in enumerate(routing.rules):
        if rule_matches(rule, path, shape, rank):
            return Route(path, shape, n_stacked, rank, rule.group, f"rules[{i}]: {describe(rule)}")
    if is_embedding(path, routing):
        return Route(path, shape, n_stacked, rank, "adamw", "default: embedding")
    if rank <= routing.adamw_max_rank:
        return Route(path, shape, n_stacked, rank, "adamw", f"default: rank<={routing.adamw_max_rank}")
    return Route(path, shape, n_stacked, rank, "main", "default: matrix")


def route_leaf(keypath, leaf, routing: RoutingConfig) -> Route:
    return route(param_path(keypath), leaf_shape(leaf), routing)


def route_tree(tree, routing: RoutingConfig) -> list[Route]:
    """Routes every leaf (in tree order) and refuses rules that match no parameter."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError("the parameter tree has no leaves: build the optimizer from the model's parameters")
    routes = [route_leaf(keypath, leaf, routing) for keypath, leaf in leaves]
    for i, rule in enumerate(routing.rules):
        if not any(rule_matches(rule, r.path, r.shape, r.logical_rank) for r in routes):
            some = ", ".join(f"{r.path} {r.shape}" for r in routes[:6])
            raise ValueError(
                f"routing.rules[{i}] ({describe(rule)}) matches no parameter; fix its pattern or rank "
                f"bounds, or remove it. Parameters include: {some}"
            )
    return routes


def map_routes(fn: Callable[[Route], object], tree, routing: RoutingConfig):
    """A tree shaped like ``tree`` with fn(route) at every leaf (e.g. labels for optax.partition)."""
    return jax.tree_util.tree_map_with_path(lambda keypath, leaf: fn(route_leaf(keypath, leaf, routing)), tree)


@dataclasses.dataclass(frozen=True)
class TableRow:
    path: str
    shape: tuple[int, ...]
    logical_rank: int
    branch: str
    weight_decay: bool
    count: int  # parameter elements
    state_bytes: int  # optimizer state held for this parameter
    rule: str


@dataclasses.dataclass(frozen=True)
class RoutingTable:
    """One row per parameter: where it goes, its size, and its optimizer-state bytes."""

    optimizer: str
    rows: tuple[TableRow, ...]

    def branches(self) -> dict[str, dict[str, int]]:
        """Per branch: number of tensors, parameter elements and state bytes."""
        totals: dict[str, dict[str, int]] = {}
        for row in self.rows:
            t = totals.setdefault(row.branch, {"tensors": 0, "count": 0, "state_bytes": 0})
            t["tensors"] += 1
            t["count"] += row.count
            t["state_bytes"] += row.state_bytes
        return totals

    def format(self) -> str:
        header = ("path", "shape", "rank", "branch", "decay", "count", "state", "rule")
        body = [
            (r.path, "x".join(map(str, r.shape)) or "()", str(r.logical_rank), r.branch,
             "yes" if r.weight_decay else "no", f"{r.count:,}", _human_bytes(r.state_bytes), r.rule)
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        lines = [f"optimizer {self.optimizer}: routing of {len(self.rows)} parameter tensors"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
        for branch, t in sorted(self.branches().items()):
            lines.append(
                f"total {branch}: {t['tensors']} tensors, {t['count']:,} parameters, "
                f"{_human_bytes(t['state_bytes'])} optimizer state"
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        rows = [{**dataclasses.asdict(r), "shape": list(r.shape)} for r in self.rows]
        return json.dumps({"optimizer": self.optimizer, "rows": rows, "branches": self.branches()}, indent=1)

    def to_csv(self) -> str:
        out = io.StringIO()
        fields = [f.name for f in dataclasses.fields(TableRow)]
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        for r in self.rows:
            writer.writerow({**dataclasses.asdict(r), "shape": "x".join(map(str, r.shape))})
        return out.getvalue()

    def save(self, path) -> Path:
        """Writes the table as JSON (.json) or CSV (.csv), chosen by the file's suffix."""
        path = Path(path)
        writers = {".json": self.to_json, ".csv": self.to_csv}
        if path.suffix not in writers:
            raise ValueError(f"cannot save a routing table as {path.name!r}: use a .json or .csv file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, writers[path.suffix]())  # a full disk leaves the old table, not 0 bytes


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exponent:.1f} {'BKMGT'[exponent]}{'iB' if exponent else ''}"
