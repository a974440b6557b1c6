"""From YAML files and --section.key=value strings to checked dataclasses; the optimizer's config
(recipes.optim.config), the trainer's (recipes.train.config) and meta-training's
(recipes.metatrain.config) are all read through here, and check their values with
recipes.errors.check_number / check_choice.

Every key is checked against the dataclass it lands in: an unknown key names the closest valid
one, a wrong type the expected type. A YAML file may name another with ``base: other.yaml``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml
from omegaconf import OmegaConf

from model.config import SIZES, ModelConfig
from recipes.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# --- typed conversion of plain dicts -----------------------------------------------------------

def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """value checked (and, for floats given as ints or strings, converted) against type tp."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                pass
        raise _type_error(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        return dataclass_from_dict(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, str):  # "3e-4" from a command line
            try:
                value = float(value)
            except ValueError:
                raise _type_error(key, tp, value) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    return value  # Any, callables (routing predicates): passed through


def _type_error(key: str, tp, value) -> ConfigError:
    return ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _unknown_key_error(key: str, name: str, valid) -> ConfigError:
    prefix = key[: -len(name)]
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} Valid keys under "
                       f"{prefix.rstrip('.') or 'the top level'}: {sorted(valid)}")


def renamed_keys(cls, values: Mapping[str, Any]) -> dict:
    """``values`` with keys a dataclass has renamed (its RENAMED_KEYS) under their current names."""
    renamed = getattr(cls, "RENAMED_KEYS", {})
    return {(renamed[key] if key in renamed and renamed[key] not in values else key): value
            for key, value in values.items()}


def dataclass_from_dict(cls, values: Mapping[str, Any], where: str = ""):
    """Builds dataclass ``cls`` from a (nested) mapping, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = renamed_keys(cls, values)
    size = None
    if cls is ModelConfig:  # `size` picks a preset; the other keys override it
        size = values.pop("size", None)
        if size is not None and size not in SIZES:
            close = difflib.get_close_matches(str(size), list(SIZES), n=1)
            raise ConfigError(f"model.size={size!r} is not a known size"
                              f"{f' (did you mean {close[0]!r}?)' if close else ''}; sizes: {list(SIZES)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        if name not in fields:
            valid = list(fields) + (["size"] if cls is ModelConfig else [])
            raise _unknown_key_error(key, name, valid)
        kwargs[name] = _convert(value, hints[name], key)
    try:
        if size is not None:
            return ModelConfig(**{**SIZES[size], **kwargs})
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"invalid {where or 'config'}: {error}") from None


def to_dict(config) -> dict:
    """Plain nested dict of a config (what is saved as the run's resolved YAML)."""
    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if callable(x):
            return getattr(x, "__name__", repr(x))
        return x
    return plain(config)


# --- files and command-line overrides ----------------------------------------------------------

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


def merge_configs(base: dict, over: Mapping) -> dict:
    """Nested dicts merged key by key, ``over`` winning."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML config as a plain dict, with its ``base:`` chain merged in (anchors work too)."""
    path = resolve_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config {path.name} includes itself through 'base:'")
    try:
        # Interpolations stay unresolved, and are refused below: a resolved ${oc.env:TOKEN} would be
        # written out with the run's config.yaml and its W&B config.
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the file and rerun") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path.name} must be a mapping of sections, got {type(loaded).__name__}")
    _refuse_interpolations(loaded, path)
    # Keys starting with "_" hold YAML anchors only (e.g. `_common: &common ...`).
    loaded = {k: v for k, v in loaded.items() if not str(k).startswith("_")}
    base = loaded.pop("base", None)
    if base is None:
        return loaded
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
