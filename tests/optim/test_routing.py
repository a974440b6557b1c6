"""Routing: every leaf of a GPT-shaped tree lands where the rule says; the routing table."""
import csv
import io
import json
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from recipes.optim.config import OptimizerConfig, RoutingConfig, RoutingRule
from recipes.optim.optimizers import build_optimizer, param_labels
from recipes.train.config import Config
from recipes.optim.routing import param_path, route_tree
from tests.optim.param_trees import EXPECTED_CELO2, L, D, abstract_tree, flat, gpt_shapes

CELO2 = dict(theta="normalized_momentum")


def labels_by_path(config, tree) -> dict:
    labels = param_labels(config, tree)
    return {param_path(kp): label for kp, label in jax.tree_util.tree_flatten_with_path(labels)[0]}


def test_default_routing_of_gpt_tree():
    params = abstract_tree(gpt_shapes())
    labels = labels_by_path(OptimizerConfig(name="celo2", **CELO2), params)
    assert labels == EXPECTED_CELO2  # every leaf labelled, each where the rule says
    muon = labels_by_path(OptimizerConfig(name="muon"), params)
    assert muon == {p: ("muon" if b == "celo2" else "adamw") for p, b in EXPECTED_CELO2.items()}
    for name in ("adamw", "celo2_base"):
        assert set(labels_by_path(OptimizerConfig(name=name), params).values()) == {name}


def test_logical_rank_excludes_the_layer_axis():
    routes = {r.path: r for r in route_tree(abstract_tree(gpt_shapes()), RoutingConfig())}
    assert (routes["blocks/attn/qkv/bias"].logical_rank, routes["blocks/attn/qkv/bias"].stacked_axes) == (1, 1)
    assert (routes["blocks/mlp/fc/kernel"].logical_rank, routes["blocks/mlp/fc/kernel"].batch_axes) == (2, 1)
    assert (routes["ln_f/scale"].logical_rank, routes["ln_f/scale"].stacked_axes) == (1, 0)
    assert (routes["wte"].logical_rank, routes["wte"].reason) == (2, "default: embedding")
    # Without the layer-axis rule a stacked bias (L, d) would look like a matrix.
    flat_rank = {r.path: r for r in route_tree(abstract_tree(gpt_shapes()), RoutingConfig(stacked_axes=0))}
    assert flat_rank["blocks/attn/qkv/bias"].logical_rank == 2
    assert flat_rank["blocks/attn/qkv/bias"].group == "main"


def test_unstacked_layers_route_the_same():
    shapes = gpt_shapes()
    blocks = shapes.pop("blocks")
    per_layer = jax.tree.map(lambda s: s[1:], blocks, is_leaf=lambda x: isinstance(x, tuple))
    shapes["h"] = {str(i): per_layer for i in range(L)}
    labels = labels_by_path(OptimizerConfig(name="celo2", **CELO2), abstract_tree(shapes))
    for path, branch in EXPECTED_CELO2.items():
        if path.startswith("blocks/"):
            for i in range(L):
                assert labels[path.replace("blocks/", f"h/{i}/")] == branch
        else:
            assert labels[path] == branch


def test_nnx_state_routes_like_the_plain_dict():
    params = abstract_tree(gpt_shapes())
    state = nnx.State(jax.tree.map(lambda x: nnx.Param(jnp.zeros(x.shape)), params))
    assert any(isinstance(k, jax.tree_util.GetAttrKey) for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0] for k in kp)
    config = OptimizerConfig(name="celo2", **CELO2)
    labels = param_labels(config, state)
    assert jax.tree.structure(labels) == jax.tree.structure(state)
    assert labels_by_path(config, state) == EXPECTED_CELO2


def test_rules_first_match_wins_with_ranks_and_predicates():
    rules = (
        RoutingRule(group="main", pattern=r"ln_f/scale"),  # a vector to the main group
        RoutingRule(group="adamw", pattern=r"^blocks/mlp/", min_rank=2),  # MLP matrices to AdamW
        RoutingRule(group="main", pattern=r"^blocks/mlp/"),  # shadowed for the kernels; matches the biases
        RoutingRule(group="adamw", predicate=lambda path, shape: shape[-1] == 3 * D),
    )
    config = OptimizerConfig(name="celo2", routing=RoutingConfig(rules=rules), **CELO2)
    labels = labels_by_path(config, abstract_tree(gpt_shapes()))
    expected = dict(EXPECTED_CELO2)
    expected.update({"ln_f/scale": "celo2", "blocks/mlp/fc/kernel": "adamw", "blocks/mlp/proj/kernel": "adamw",
                     "blocks/mlp/fc/bias": "celo2", "blocks/mlp/proj/bias": "celo2",
                     "blocks/attn/qkv/kernel": "adamw"})
    assert labels == expected


def test_rules_from_dicts():
    config = OptimizerConfig.from_dict({"name": "celo2", "theta": "normalized_momentum",
                                        "routing": {"rules": [{"group": "adamw", "pattern": "proj"}]}})
    assert config.routing.rules == (RoutingRule(group="adamw", pattern="proj"),)
    # Configs saved when the key was named "branch" (a run directory's config.yaml) load the same.
    for read in (OptimizerConfig.from_dict, lambda values: Config.from_dict({"optimizer": values}).optimizer):
        former = read({"name": "celo2", "routing": {"rules": [{"branch": "adamw", "pattern": "proj"}]}})
        assert former.routing.rules == config.routing.rules
    labels = labels_by_path(config, abstract_tree(gpt_shapes()))
    assert labels["blocks/attn/proj/kernel"] == "adamw" and labels["blocks/attn/qkv/kernel"] == "celo2"


def test_rule_that_matches_nothing_is_refused():
    config = OptimizerConfig(name="celo2", routing=RoutingConfig(rules=(RoutingRule(group="adamw", pattern="lm_head"),)),
                             **CELO2)
    with pytest.raises(ValueError, match=re.escape("routing.rules[0] (pattern='lm_head' -> adamw) matches no parameter")):
        build_optimizer(config, abstract_tree(gpt_shapes()), total_steps=10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(group="sgd"), "routing rule group must be one of ['main', 'adamw'], got 'sgd'"),
    (dict(group="main", pattern="blocks/("), "is not a valid regex"),
    (dict(group="main", min_rank=3, max_rank=2), "it can match nothing"),
])
def test_bad_rule_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RoutingRule(**kwargs)


def test_muon_never_gets_embeddings_or_vectors():
    params = abstract_tree(gpt_shapes())
    to_muon = RoutingConfig(rules=(RoutingRule(group="main", pattern="^wte$"),))
    with pytest.raises(ValueError, match="wte is an embedding .* embeddings must use AdamW"):
        build_optimizer(OptimizerConfig(name="muon", routing=to_muon), params, total_steps=10)
    vector = RoutingConfig(rules=(RoutingRule(group="main", pattern="ln_f/bias"),))
    with pytest.raises(ValueError, match="has logical rank 1 .* route it to 'adamw'"):
        build_optimizer(OptimizerConfig(name="muon", routing=vector), params, total_steps=10)
    # By default the embedding rule keeps the (rank 2) token table on AdamW.
    assert labels_by_path(OptimizerConfig(name="muon"), params)["wte"] == "adamw"


def test_routing_table_rows_state_bytes_and_files(tmp_path):
    params = abstract_tree(gpt_shapes())
    config = OptimizerConfig(name="celo2", decay_rank1=False, **CELO2)
    _, table = build_optimizer(config, params, total_steps=10)
    rows = {r.path: r for r in table.rows}
    assert rows.keys() == EXPECTED_CELO2.keys()
    assert {p: r.branch for p, r in rows.items()} == EXPECTED_CELO2
    assert rows["blocks/attn/qkv/kernel"].count == L * D * 3 * D
    # AdamW keeps mu and nu; Celo2 keeps 3 momenta + 1 second moment per element and
    # 3 row (small axis, D) + 3 column (large axis, 3D) statistics per layer, all float32.
    assert rows["wte"].state_bytes == 2 * 4 * rows["wte"].count
    assert rows["blocks/attn/qkv/kernel"].state_bytes == 4 * (4 * L * D * 3 * D + 3 * L * D + 3 * L * 3 * D)
    assert not rows["blocks/ln_1/scale"].weight_decay and rows["wte"].weight_decay  # decay_rank1=False
    totals = table.branches()
    assert totals["celo2"]["tensors"] == 4 and totals["adamw"]["tensors"] == 12
    assert sum(t["count"] for t in totals.values()) == sum(r.count for r in table.rows)

    text = table.format()
    assert "blocks/mlp/fc/kernel" in text and "total celo2: 4 tensors" in text
    loaded = json.loads(table.save(tmp_path / "routing.json").read_text())
    assert loaded["optimizer"] == "celo2" and len(loaded["rows"]) == 16
    assert {r["path"]: r["branch"] for r in loaded["rows"]} == EXPECTED_CELO2
    csv_rows = list(csv.DictReader(io.StringIO(table.save(tmp_path / "routing.csv").read_text())))
    assert {r["path"]: r["branch"] for r in csv_rows} == EXPECTED_CELO2
    with pytest.raises(ValueError, match="use a .json or .csv file name"):
        table.save(tmp_path / "routing.txt")


def test_muon_table_counts_one_momentum():
    _, table = build_optimizer(OptimizerConfig(name="muon"), abstract_tree(gpt_shapes()), total_steps=10)
    rows = {r.path: r for r in table.rows}
    assert rows["blocks/mlp/fc/kernel"].branch == "muon"
    assert rows["blocks/mlp/fc/kernel"].state_bytes == 4 * rows["blocks/mlp/fc/kernel"].count
    assert flat(abstract_tree(gpt_shapes())).keys() == rows.keys()
