"""YAML recipes and --section.key=value overrides -> config classes (model.config_base).

A recipe may start from another (``base: other.yaml``); OmegaConf merges the chain and the overrides. Top-level
keys starting with "_" only hold anchors. Interpolations and OmegaConf's ``???`` are refused, never resolved.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Mapping, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config_base import ConfigError, load
from recipes.recipe_yaml import load_yaml, yaml_value

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML recipe as a plain dict, with its ``base:`` chain merged in (anchors work too)."""
    path = resolve_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config {path.name} includes itself through 'base:'")
    loaded = load_yaml(path) or {}
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
            raise ConfigError(f"{origin}: {prefix}{key} is an interpolation ({value!r}), which recipes do not resolve "
                              "(a run saves its settings in plain text): write the value itself")
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


def override_pairs(args: Sequence[str], check_flag=None) -> list[tuple[str, str]]:
    """["--optimizer.lr=3e-4", "--train.steps", "10"] -> [("optimizer.lr", "3e-4"), ("train.steps", "10")].
    ``check_flag(arg, rest)``, if given, sees each flag as typed, and the arguments after it, first."""
    pairs, args = [], list(args)
    while args:
        arg = args.pop(0)
        if check_flag is not None:
            check_flag(arg, args)
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" not in arg and not args:
            raise ConfigError(f"override {arg} has no value; write {arg}=VALUE")
        key, _, text = arg[2:].partition("=") if "=" in arg else (arg[2:], "", args.pop(0))
        pairs.append((key, text))
    return pairs


def parse_overrides(args: Sequence[str]) -> dict:
    """["--optimizer.lr=3e-4", "--train.steps", "10"] -> {"optimizer": {"lr": 3e-4}, "train": {"steps": 10}}."""
    out: dict = {}
    for key, text in override_pairs(args):
        node, *parts = out, *key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = yaml_value(text)
    _refuse_unresolved(out, "overrides")
    return out


def load_file(cls, path: str | Path | None, overrides: Sequence[str] = ()):
    """``cls`` from a YAML recipe (None: the defaults) with ``--section.key=value`` overrides over it."""
    return load(cls, merge_configs(read_yaml(path) if path is not None else {}, parse_overrides(overrides)))
