"""What every config class is built on: frozen pydantic dataclasses whose fields carry types, bounds,
choices and a one-line description, and the one wording of pydantic's refusals users see."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import types
import typing
from typing import Annotated, Any, Literal, Mapping

from pydantic import AllowInfNan, BeforeValidator, ConfigDict, StrictBool, StrictInt, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and how to fix it."""


def _bounds_text(low=None, high=None, low_open: bool = False, high_open: bool = False) -> str:
    """" in [0, 1)", " >= 1", " < 2" or ""."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    return "" if high is None else f" {'<' if high_open else '<='} {high:g}"


def _not_bool(value):
    if isinstance(value, bool):  # pydantic would take True as 1.0
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


Int, Bool = StrictInt, StrictBool  # no bools, "3" or 3.0 as ints; true or false only as bools
Float = Annotated[float, AllowInfNan(False), BeforeValidator(_not_bool)]  # also from "3e-4"; no nan or inf


@dataclasses.dataclass(frozen=True)
class Must:
    """Field metadata: what a value must be, where type and bounds say it less well; a hint after a refusal."""
    text: str | None = None
    hint: str | None = None


def config_class(key_prefix: str = "", extra_keys: Mapping[str, str] | None = None):
    """A frozen pydantic dataclass that refuses unknown keys, raises ConfigError, and has ``from_dict`` and
    ``to_dict``. ``key_prefix`` names its keys when built on its own ("optimizer." -> optimizer.lr);
    ``extra_keys`` (name: description) are keys its validators take."""
    def make(cls):
        cls = pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
        validate = cls.__init__

        @functools.wraps(validate)
        def __init__(self, *args, **kwargs):
            try:
                validate(self, *args, **kwargs)
            except ValidationError as error:
                raise config_error(error, type(self), from_keys=False) from None

        cls.__init__, cls.KEY_PREFIX, cls.EXTRA_KEYS = __init__, key_prefix, dict(extra_keys or {})
        cls.from_dict, cls.to_dict = classmethod(load), to_dict
        return cls
    return make


_adapter = functools.cache(TypeAdapter)


def load(cls, values: Mapping[str, Any]):
    """``cls`` built from a nested mapping (parsed YAML plus overrides)."""
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as error:
        raise config_error(error, cls, from_keys=True) from None


def to_dict(config) -> Any:
    """Plain nested dict of a config (what a run saves): tuples become lists, callables their names."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return getattr(config, "__name__", repr(config)) if callable(config) else config


# Refusals of a value of the right type outside what the field allows; others are of the wrong type.
_LIMIT_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error",
                 "too_short", "too_long", "string_too_short", "string_too_long"}


def config_error(error: ValidationError, cls, from_keys: bool) -> ConfigError:
    """The first of pydantic's refusals as one line: the key, the bad value, what the key allows, the
    closest valid key. ``from_keys``: the values came as keys of a mapping (a file, overrides), so a
    value of the wrong type is named with the type expected."""
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
        section, owner = key[: -len(loc[-1])], _unwrap(_field_at(cls, loc[:-1])[0])[0]
        valid = [*owner.__pydantic_fields__, *owner.EXTRA_KEYS]
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        return ConfigError(f"unknown config key {key!r}" + (f"; did you mean {section + close[0]!r}?" if close else "")
                           + f" Valid keys under {section.rstrip('.') or 'the top level'}: {sorted(valid)}")
    if kind in ("missing", "dataclass_type", "dataclass_exact_type"):
        return ConfigError(f"config key {key!r} is required" if kind == "missing"
                           else f"config section {key!r} must be a mapping of keys, got {value!r}")
    try:
        annotation, field = _field_at(cls, loc)
    except (KeyError, IndexError, AttributeError):  # not a field's own value
        return ConfigError(f"{key}: {problem['msg']}")
    base, optional, _ = _unwrap(annotation)
    if from_keys and kind not in _LIMIT_ERRORS:
        expected = "list" if typing.get_origin(base) is tuple else getattr(base, "__name__", str(base))
        return ConfigError(f"config key {key!r} expects {expected}{' or null' if optional else ''}, "
                           f"got {type(value).__name__} {value!r}")
    choices = [str(c) for c in typing.get_args(base)] if typing.get_origin(base) is Literal else []
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6) if not isinstance(value, bool) else []
    close = f"; did you mean {close[0]!r}?" if close else ""
    if base is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):  # as the field would hold it
            value = float(value)
    hint = _must(annotation, field, "hint")
    return ConfigError(f"{key} must be {allowed(annotation, field)}, got {value!r}{close}{f'; {hint}' if hint else ''}")


def allowed(annotation, field: FieldInfo | None = None) -> str:
    """What a field allows, in words: "an int >= 1", "one of ['a', 'b']", "a number in [0, 1) or null"."""
    base, optional, metadata = _unwrap(annotation)
    if _must(annotation, field, "text"):
        return _must(annotation, field, "text")
    limits = {n: getattr(m, n) for m in metadata + (field.metadata if field else []) for n in
              ("gt", "ge", "lt", "le", "min_length") if hasattr(m, n)}
    if typing.get_origin(base) is Literal:
        text = f"one of {list(typing.get_args(base))}"
    else:
        text = {int: "an int", float: "a number", bool: "true or false", str: "a string"}.get(
            base, "a list" if typing.get_origin(base) is tuple else "a Python callable")
        text = f"a non-empty {text.split()[-1]}" if limits.get("min_length") == 1 else text
        text += _bounds_text(limits.get("gt", limits.get("ge")), limits.get("lt", limits.get("le")),
                            "gt" in limits, "lt" in limits)
    return text + (" or null" if optional else "")


def _must(annotation, field: FieldInfo | None, name: str) -> str | None:
    """The ``name`` ("text" or "hint") of the field's first Must that has one."""
    metadata = _unwrap(annotation)[2] + (field.metadata if field else [])
    return next((getattr(m, name) for m in metadata if isinstance(m, Must) and getattr(m, name)), None)


def _unwrap(annotation) -> tuple[Any, bool, list]:
    """(the type without Annotated or Optional, whether None is allowed, the Annotated metadata)."""
    optional, metadata = False, []
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = typing.get_args(annotation)
            metadata += [m for item in extra for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
        elif origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation):
            optional = True
            (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        else:
            return annotation, optional, metadata


def _field_at(cls, loc) -> tuple[Any, FieldInfo | None]:
    """The annotation and field (None for a list item) at ``loc``."""
    annotation, field = cls, None
    for part in loc:
        base = _unwrap(annotation)[0]
        if isinstance(part, int):  # an item of tuple[X, ...] or of a fixed tuple[X, Y, Z]
            args = typing.get_args(base)
            annotation, field = args[0 if args[-1] is Ellipsis else part], None
        else:
            field = base.__pydantic_fields__[part]
            annotation = field.annotation
    return annotation, field
