"""YAML as recipes and overrides are read: safe, strict about keys given twice, and bounded (an alias bomb
is refused before it is built)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from model.config_base import ConfigError

MAX_EXPANDED_VALUES = 100_000  # a recipe is a few hundred values; more, once aliases expand, is an alias bomb


class _OverrideLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe YAML in which a key given twice is an error, dates stay text and only true/false are booleans
    (YAML 1.1 reads on/off/yes/no so: --logging.wandb=on would be True). 1e5 stays text, so a text key
    may take it; a number key reads it from the text."""

    def flatten_mapping(self, node):
        seen = set()
        for key in (k for k, _ in node.value if k.tag == "tag:yaml.org,2002:str"):
            if key.value in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key.value}", key.start_mark)
            seen.add(key.value)
        super().flatten_mapping(node)


class _RecipeLoader(_OverrideLoader):
    """Recipes also read 1e-3 as a float (YAML 1.1 wants 1.0e-3)."""


_OverrideLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:timestamp",
                                                                       "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_OverrideLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _expanded_size(node, path: Path, sizes: dict, open_nodes: set) -> int:
    """How many values a YAML node holds once its aliases expand; refuses an alias inside itself."""
    if id(node) not in sizes:
        if id(node) in open_nodes:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: a YAML alias refers to a value that contains "
                              "it, which never ends; write the value out")
        open_nodes.add(id(node))
        children = node.value if isinstance(node.value, list) else []  # a mapping's are (key, value) pairs
        sizes[id(node)] = 1 + sum(_expanded_size(item, path, sizes, open_nodes) for child in children
                                  for item in (child if isinstance(child, tuple) else (child,)))
        if sizes[id(node)] > MAX_EXPANDED_VALUES:
            raise ConfigError(f"{path}: its YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values; "
                              "a recipe needs far fewer: write the values out")
    return sizes[id(node)]


def load_yaml(path: Path):
    """The YAML of ``path`` as Python values; alias expansion is bounded before anything is built."""
    try:
        loader = _RecipeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node, path, {}, set())
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}): save the recipe as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the file and rerun") from None
    except RecursionError:
        raise ConfigError(f"{path}: its YAML nests too deeply to be a recipe; fix the file and rerun") from None


def yaml_value(text: str):
    """A YAML scalar (1e-3, true, null, [1, 2]); text YAML cannot read (**ROMEO**) stays a string."""
    try:
        return yaml.load(text, _OverrideLoader) if text.strip() else text
    except yaml.YAMLError:
        return text
