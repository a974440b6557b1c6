"""From YAML files and --section.key=value strings to checked, frozen config classes.

The model's, optimizer's, trainer's and meta-training's configs are pydantic dataclasses made by
``config_class``: types, bounds and choices sit on their fields, rules that span fields in their
validators. ``load`` builds one from nested dicts, ``load_file`` from a YAML file and command-line
overrides, and ``to_dict`` turns one back; ``config_error``
words whatever pydantic refuses as the one line users see: the key, the bad value, the closest
valid key. A YAML file may name another with ``base: other.yaml``.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import BeforeValidator, ConfigDict, StrictBool, StrictInt, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from recipes.errors import ConfigError, bounds_text

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# --- field types -------------------------------------------------------------------------------

def _number(value):
    """A float from a number or a numeric string ("3e-4" from a command line); bools, nan and inf refused."""
    if isinstance(value, bool):  # float() would take True as 1.0
        raise PydanticCustomError("float_type", "Input should be a valid number")
    if isinstance(value, (int, str)):
        try:
            value = float(value)
        except (ValueError, OverflowError):
            return value  # refused as a float by pydantic, naming the value as given
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    return value


Int = StrictInt  # no bools, no "3", no 3.0
Bool = StrictBool  # true or false only
Float = Annotated[float, BeforeValidator(_number)]


@dataclasses.dataclass(frozen=True)
class Must:
    """Field metadata: what a value must be, where its type and bounds say it less well."""

    text: str


def config_class(key_prefix: str = "", extra_keys: tuple[str, ...] = ()):
    """Makes a class a frozen pydantic dataclass that refuses unknown keys and raises ConfigError.

    ``key_prefix`` names its keys in messages when it is built on its own ("optimizer." ->
    optimizer.lr); ``extra_keys`` are keys its own validators take besides its fields. The class
    gains ``from_dict`` (``load``), ``from_file`` (``load_file``) and ``to_dict``.
    """
    def make(cls):
        cls = pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
        validate = cls.__init__

        @functools.wraps(validate)
        def __init__(self, *args, **kwargs):
            try:
                validate(self, *args, **kwargs)
            except ValidationError as error:
                raise config_error(error, type(self), from_keys=False) from None

        cls.__init__ = __init__
        cls.KEY_PREFIX, cls.EXTRA_KEYS = key_prefix, extra_keys
        cls.from_dict = classmethod(load)
        cls.from_file = classmethod(load_file)
        cls.to_dict = to_dict
        return cls
    return make


# --- dicts in and out --------------------------------------------------------------------------

@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def load(cls, values: Mapping[str, Any], context: dict | None = None):
    """``cls`` built from a nested mapping (parsed YAML plus overrides); ``context`` reaches its
    validators. A refusal is a ConfigError naming the key."""
    try:
        return _adapter(cls).validate_python(values, context=context)
    except ValidationError as error:
        raise config_error(error, cls, from_keys=True) from None


def load_file(cls, path: str | Path | None, overrides: Sequence[str] = (), context: dict | None = None):
    """``cls`` from a YAML file (None: the defaults) with ``--section.key=value`` overrides over it."""
    values = merge_configs(read_yaml(path) if path is not None else {}, parse_overrides(list(overrides)))
    return load(cls, values, context)


def to_dict(config) -> dict:
    """Plain nested dict of a config (what is saved as the run's resolved YAML): tuples become
    lists, callables their names."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if callable(config):
        return getattr(config, "__name__", repr(config))
    return config


# --- pydantic's refusals as messages -----------------------------------------------------------

# Errors of a value of the right type outside what the field allows; others are of the wrong type.
_LIMIT_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error",
                 "too_short", "too_long", "string_too_short", "string_too_long"}


def config_error(error: ValidationError, cls, from_keys: bool) -> ConfigError:
    """The first of pydantic's refusals as a ConfigError. ``from_keys``: the values came as keys of
    a mapping (a file, overrides), so a value of the wrong type is named with its expected type;
    otherwise (Python arguments) with what the field allows."""
    problems = error.errors(include_url=False)
    unknown = [p for p in problems if p["type"] in ("unexpected_keyword_argument", "extra_forbidden")]
    problem = (unknown or problems)[0]
    loc, value, kind = problem["loc"], problem.get("input"), problem["type"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    key = cls.KEY_PREFIX + where
    if kind == "value_error":  # a validator's own message
        cause = problem["ctx"]["error"]
        return ConfigError(str(cause) if isinstance(cause, ConfigError) or not where else f"invalid {where}: {cause}")
    if unknown:
        return _unknown_key_error(key, loc[-1], _owner_keys(cls, loc[:-1]))
    if kind == "missing":
        return ConfigError(f"config key {key!r} is required")
    if kind in ("dataclass_type", "dataclass_exact_type"):
        return ConfigError(f"config section {key!r} must be a mapping of keys, got {value!r}")
    try:
        annotation, metadata, hint = _field_at(cls, loc)
    except (KeyError, IndexError, AttributeError):  # not a field's own value
        return ConfigError(f"{key}: {problem['msg']}")
    if from_keys and kind not in _LIMIT_ERRORS:
        return ConfigError(f"config key {key!r} expects {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    return ConfigError(_must_be(key, value, annotation, metadata, hint))


def _unknown_key_error(key: str, name: str, valid) -> ConfigError:
    prefix = key[: -len(name)]
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} Valid keys under "
                       f"{prefix.rstrip('.') or 'the top level'}: {sorted(valid)}")


def _must_be(key: str, value, annotation, metadata: list, hint: str | None) -> str:
    """'<key> must be <what the field allows>, got <value>[; hint]'."""
    base, optional, inner = _unwrap(annotation)
    metadata = metadata + inner
    must = next((m.text for m in metadata if isinstance(m, Must)), None)
    limits = {name: getattr(m, name) for m in metadata for name in ("gt", "ge", "lt", "le", "min_length")
              if hasattr(m, name)}
    close = ""
    if typing.get_origin(base) is Literal:
        choices = list(typing.get_args(base))
        allowed = f"one of {choices}"
        match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        close = f"; did you mean {match[0]!r}?" if match and not isinstance(value, bool) else ""
    else:
        kind = {int: "an int", float: "a number", bool: "true or false", str: "a string"}.get(base, "a list")
        if limits.get("min_length") == 1:
            kind = f"a non-empty {kind.split()[-1]}"
        low, high = limits.get("gt", limits.get("ge")), limits.get("lt", limits.get("le"))
        allowed = kind + bounds_text(low, high, "gt" in limits, "lt" in limits)
    allowed = must or allowed + (" or null" if optional else "")
    if base is float and not isinstance(value, bool):
        try:  # as the field would hold it
            value = float(value)
        except (TypeError, ValueError):
            pass
    return f"{key} must be {allowed}, got {value!r}{close}" + (f"; {hint}" if hint else "")


def _unwrap(annotation) -> tuple[Any, bool, list]:
    """(the type without Annotated or Optional, whether None is allowed, the Annotated metadata)."""
    optional, metadata = False, []
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = typing.get_args(annotation)
            for item in extra:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        elif origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation):
            optional = True
            (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        else:
            return annotation, optional, metadata


def _field_at(cls, loc) -> tuple[Any, list, str | None]:
    """The annotation, constraints and description of the field (or list item) at ``loc``."""
    annotation, metadata, description = cls, [], None
    for part in loc:
        base = _unwrap(annotation)[0]
        if isinstance(part, int):  # an item of tuple[X, ...] or of a fixed tuple[X, Y, Z]
            args = typing.get_args(base)
            annotation, metadata, description = args[0 if args[-1] is Ellipsis else part], [], None
        else:
            field = base.__pydantic_fields__[part]
            annotation, metadata, description = field.annotation, list(field.metadata), field.description
    return annotation, metadata, description


def _owner_keys(cls, loc) -> list[str]:
    """The keys the config class at ``loc`` takes."""
    owner = _unwrap(_field_at(cls, loc)[0])[0]
    return list(owner.__pydantic_fields__) + list(owner.EXTRA_KEYS)


def _type_name(tp) -> str:
    base, optional, _ = _unwrap(tp)
    name = "list" if typing.get_origin(base) is tuple else getattr(base, "__name__", str(base))
    return name + (" or null" if optional else "")


# --- files and command-line overrides ----------------------------------------------------------

class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe YAML, plus: 1e-3 is a float (YAML 1.1 wants 1.0e-3), dates stay text, a key given
    twice is an error."""

    def flatten_mapping(self, node):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:str":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found duplicate key {key_node.value}",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        super().flatten_mapping(node)


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                  list("-+0123456789."))


def resolve_path(name: str | Path) -> Path:
    """A path as given, else a bare name looked up in configs/ (".yaml" optional)."""
    path = Path(name)
    candidates = [path, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(path.name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config file {str(name)!r} not found (also looked in configs/).{hint} "
                      f"Known configs: {known}")


def merge_configs(base: dict, over: Mapping, where: str = "") -> dict:
    """Nested dicts merged key by key, ``over`` winning. Settings merged into a section the base
    gives as a single value are refused: merging would drop that value without a word."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_configs(out[key], value, f"{where}{key}.")
        elif isinstance(value, Mapping) and out.get(key) is not None:
            raise ConfigError(f"config section {where}{key} must be a mapping of keys, got {out[key]!r}; "
                              f"write its settings indented under '{key}:'")
        else:
            out[key] = value
    return out


# A recipe is a few hundred values; more than this once aliases are expanded is an alias bomb.
MAX_EXPANDED_VALUES = 100_000


def _expanded_size(node, path: Path, sizes: dict, open_nodes: set) -> int:
    """How many values the YAML node holds once its aliases are expanded; refuses an alias that
    contains itself (it would expand forever)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: a YAML alias refers to a value that contains "
                          "it, which never ends; write the value out")
    open_nodes.add(key)
    children = node.value if isinstance(node.value, list) else []
    items = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
    size = 1 + sum(_expanded_size(item, path, sizes, open_nodes) for item in items)
    open_nodes.discard(key)
    if size > MAX_EXPANDED_VALUES:
        raise ConfigError(f"{path}: its YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values; "
                          "a recipe needs far fewer: write the values out")
    sizes[key] = size
    return size


def _load_yaml_text(path: Path):
    """The YAML of ``path`` as Python values, with alias expansion bounded before anything is built."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}): save the recipe as UTF-8") from None
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, path, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML config as a plain dict, with its ``base:`` chain merged in (anchors work too)."""
    path = resolve_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config {path.name} includes itself through 'base:'")
    try:
        loaded = _load_yaml_text(path) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the file and rerun") from None
    except RecursionError:
        raise ConfigError(f"{path}: its YAML nests too deeply to be a recipe; fix the file and rerun") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path.name} must be a mapping of sections, got {type(loaded).__name__}")
    # Interpolations are refused, not resolved: a resolved ${oc.env:TOKEN} would be written out
    # with the run's config.yaml and its W&B config.
    _refuse_interpolations(loaded, path)
    # Keys starting with "_" hold YAML anchors only (e.g. `_common: &common ...`).
    loaded = {k: v for k, v in loaded.items() if not str(k).startswith("_")}
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must name one recipe (a file name or path), got {base!r}")
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    return merge_configs(read_yaml(base_path if base_path.is_file() else base, _seen + (path,)), loaded)


def _refuse_interpolations(tree, path: Path, prefix: str = "") -> None:
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        where = f"{prefix}{key}"
        if isinstance(value, str) and "${" in value:
            raise ConfigError(f"{path}: {where} is an interpolation ({value!r}), which recipes do not resolve: a "
                              "run saves its settings in plain text, so an environment variable would be written "
                              "out. Write the value itself, or pass it as --" + where + "=VALUE")
        _refuse_interpolations(value, path, f"{where}.")


def parse_overrides(args: list[str]) -> dict:
    """["--optimizer.lr=3e-4", "--train.steps", "10"] -> {"optimizer": {"lr": 3e-4}, "train": {"steps": 10}}."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value; write {arg}=VALUE")
        value = _override_value(text)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = value
        i += 1
    return out


def _override_value(text: str):
    """A YAML scalar (1e-3, true, null, [1, 2]); text YAML cannot read (**ROMEO**) stays a string."""
    if not text.strip():
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
