"""From YAML recipes and --section.key=value overrides to config classes (model.config_base), and
back to the keys --help lists.

A recipe may name another with ``base: other.yaml``; OmegaConf merges the chain and the overrides.
YAML is read here first, bounded (an alias bomb is refused before it is built), with 1e-3 a float and
a key given twice an error; top-level keys starting with "_" only hold anchors. Interpolations
(``${...}``) and OmegaConf's missing-value mark ``???`` are refused, never resolved.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import textwrap
import typing
from pathlib import Path
from typing import Mapping, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config_base import ConfigError, allowed, load, to_dict

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MAX_EXPANDED_VALUES = 100_000  # a recipe is a few hundred values; more, once aliases expand, is an alias bomb


class _TextLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe YAML in which dates stay text and a key given twice is an error (what overrides are read with)."""

    def flatten_mapping(self, node):
        seen = set()
        for key in (k for k, _ in node.value if k.tag == "tag:yaml.org,2002:str"):
            if key.value in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key.value}", key.start_mark)
            seen.add(key.value)
        super().flatten_mapping(node)


class _YamlLoader(_TextLoader):
    """What recipes are read with: also 1e-3 is a float (YAML 1.1 wants 1.0e-3)."""


# Dates stay text, and only true/false are booleans (YAML 1.2): YAML 1.1 reads on/off/yes/no as
# booleans, so --logging.wandb=on would reach the config as True.
_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:timestamp",
                                                                       "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_TextLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def resolve_path(name: str | Path) -> Path:
    """A path as given, else a bare name looked up in configs/ (".yaml" optional)."""
    path = Path(name)
    for candidate in (path, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(path.name, known, n=1)
    raise ConfigError(f"config file {str(name)!r} not found (also looked in configs/)."
                      f"{f' Did you mean {close[0]!r}?' if close else ''} Known configs: {known}")


def _expanded_size(node, path: Path, sizes: dict, open_nodes: set) -> int:
    """How many values a YAML node holds once its aliases expand; refuses an alias inside itself."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: a YAML alias refers to a value that contains "
                          "it, which never ends; write the value out")
    open_nodes.add(id(node))
    children = node.value if isinstance(node.value, list) else []  # a mapping's are (key, value) pairs
    items = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
    size = sizes[id(node)] = 1 + sum(_expanded_size(item, path, sizes, open_nodes) for item in items)
    open_nodes.discard(id(node))
    if size > MAX_EXPANDED_VALUES:
        raise ConfigError(f"{path}: its YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values; "
                          "a recipe needs far fewer: write the values out")
    return size


def _load_yaml(path: Path):
    """The YAML of ``path`` as Python values; alias expansion is bounded before anything is built."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}): save the recipe as UTF-8") from None
    try:
        loader = _YamlLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _expanded_size(node, path, {}, set())
                return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the file and rerun") from None
    except RecursionError:
        raise ConfigError(f"{path}: its YAML nests too deeply to be a recipe; fix the file and rerun") from None


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML recipe as a plain dict, with its ``base:`` chain merged in (anchors work too)."""
    path = resolve_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config {path.name} includes itself through 'base:'")
    loaded = _load_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path.name} must be a mapping of sections, got {type(loaded).__name__}")
    _refuse_unresolved(loaded, str(path))
    loaded = {k: v for k, v in loaded.items() if not str(k).startswith("_")}
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must name one recipe (a file name or path), got {base!r}")
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    return merge_configs(read_yaml(base_path if base_path.is_file() else base, _seen + (path,)), loaded)


def _refuse_unresolved(tree, origin: str, prefix: str = "") -> None:
    """A run saves its settings in plain text: an interpolation resolved (${oc.env:TOKEN}) would be written out."""
    for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ():
        if isinstance(value, str) and "${" in value:
            raise ConfigError(f"{origin}: {prefix}{key} is an interpolation ({value!r}), which recipes do not resolve: "
                              "a run saves its settings in plain text, so an environment variable would be written "
                              "out. Write the value itself" + ("" if origin == "overrides" else
                                                               f", or pass it as --{prefix}{key}=VALUE"))
        if value == "???":
            raise ConfigError(f"{origin}: {prefix}{key} is '???', OmegaConf's mark of a missing value: write the value")
        _refuse_unresolved(value, origin, f"{prefix}{key}.")


def merge_configs(base: dict, over: Mapping) -> dict:
    """``over`` merged into ``base`` key by key (OmegaConf.merge). Settings for a section that ``base``
    gives as a single value are refused: the merge would drop that value without a word."""
    def check(base, over, where=""):
        for key, value in over.items():
            if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
                check(base[key], value, f"{where}{key}.")
            elif isinstance(value, Mapping) and base.get(key) is not None:
                raise ConfigError(f"config section {where}{key} must be a mapping of keys, got {base[key]!r}; "
                                  f"write its settings indented under '{key}:'")
    check(base, over)
    try:
        return OmegaConf.to_container(OmegaConf.merge(base, over))
    except RecursionError:
        raise ConfigError("config values nest too deeply to be a recipe; fix the file or the override") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"config values that OmegaConf cannot hold: {str(error).splitlines()[0]}") from None


def parse_overrides(args: Sequence[str]) -> dict:
    """["--optimizer.lr=3e-4", "--train.steps", "10"] -> {"optimizer": {"lr": 3e-4}, "train": {"steps": 10}}."""
    out: dict = {}
    args = list(args)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" not in arg and not args:
            raise ConfigError(f"override {arg!r} has no value; write {arg}=VALUE")
        key, text = arg[2:].split("=", 1) if "=" in arg else (arg[2:], args.pop(0))
        node, *parts = out, *key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = _override_value(text)
    _refuse_unresolved(out, "overrides")
    return out


def _override_value(text: str):
    """A YAML scalar (1e-3, true, null, [1, 2]); text YAML cannot read (**ROMEO**) stays a string."""
    try:
        return yaml.load(text, _TextLoader) if text.strip() else text
    except yaml.YAMLError:
        return text


def load_file(cls, path: str | Path | None, overrides: Sequence[str] = (), context: dict | None = None):
    """``cls`` from a YAML recipe (None: the defaults) with ``--section.key=value`` overrides over it."""
    return load(cls, merge_configs(read_yaml(path) if path is not None else {}, parse_overrides(overrides)), context)


def keys_help(cls, prefix: str = "") -> str:
    """Every key of config class ``cls``, one a line: key=default, what it allows, its description."""
    lines = [] if prefix else ["config keys, set as --KEY=VALUE (a recipe's values replace these defaults):"]
    lines += [_row(prefix + name, text) for name, text in getattr(cls, "EXTRA_KEYS", {}).items()]
    for name, field in cls.__pydantic_fields__.items():
        key, args = prefix + name, typing.get_args(field.annotation)
        if dataclasses.is_dataclass(field.annotation):
            lines.append(keys_help(field.annotation, f"{key}."))
            continue
        default = "  (required)" if field.is_required() else "" if field.default_factory else \
            "=" + json.dumps(to_dict(field.default))  # as it would be typed after --KEY=
        lines.append(_row(key + default, "; ".join(filter(None, [allowed(field.annotation, field),
                                                                 field.description]))))
        if args and dataclasses.is_dataclass(args[0]):  # a list of config classes: their keys
            lines.append(keys_help(args[0], f"{key}[]."))
    return "\n".join(lines)


def _row(left: str, text: str, width: int = 40) -> str:
    head = f"  {left}".ljust(width) if len(left) + 3 <= width else f"  {left}\n" + " " * width
    return head + ("\n" + " " * width).join(textwrap.wrap(text, 120 - width))
