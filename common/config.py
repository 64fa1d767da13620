"""Strict configuration: dataclasses <-> nested dicts, yaml files and `key=value` overrides. Unknown keys and
wrongly typed values are errors (`ConfigError`), never silently ignored.

    cfg = load_config(TrainConfig, yaml.safe_load(text), ["run.steps=100", "optim.betas=[0.9, 0.99]"])

A config class may define a classmethod `resolve_raw(data) -> data` that fills in what depends on other keys (a
named preset, a checkpoint's own config) before the dataclass is built from the user's raw dict.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration that cannot be built: unknown key, wrong type, unknown preset, inconsistent sizes."""


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside annotation `tp` (also inside `X | None`), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _is_mapping_type(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict or any(_is_mapping_type(a) for a in typing.get_args(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; lists become tuples for tuple fields, ints become floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} does not match {tp}")
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if args and len(args) != len(value):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args or [Any] * len(value)))
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, key) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # yaml 1.1 reads "1e-4" (no dot) as a string
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested mapping; unknown keys and wrongly typed values raise ConfigError.

    Args:
        cls: the dataclass type.
        data: nested mapping (e.g. parsed yaml/json); missing keys take the dataclass defaults.
        prefix: dotted path of `data` inside a larger config, used in error messages.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix or cls.__name__}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known keys: {', '.join(names)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        sub = _dataclass_of(hints[name])
        if sub is not None and isinstance(value, Mapping):
            kwargs[name] = from_dict(sub, value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a dataclass's own validation (__post_init__)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"config section '{prefix.rstrip('.') or cls.__name__}': {err}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain nested dict (tuples become lists) that json/yaml can write."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def merge_dicts(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `extra`, nested dicts merged key by key (a copy; neither input changes)."""
    out = copy.deepcopy(dict(base))
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) \
            else copy.deepcopy(v)
    return out


def set_override(data: dict[str, Any], cls: type, item: str) -> None:
    """Apply one `key.sub=value` override (the value parsed as a yaml scalar or list) to `data`, a nested dict laid
    out like dataclass `cls`; the key path is checked against the dataclass fields (inside a free-form dict field,
    such as a transformers config, any key is accepted)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node, schema = data, cls  # schema: the dataclass of this level, None inside a free-form dict
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        field_type: Any = None
        if schema is not None:
            hints = typing.get_type_hints(schema)
            if part not in {f.name for f in dataclasses.fields(schema)}:
                raise ConfigError(f"unknown config key '{path}' in override {item!r}")
            field_type = hints[part]
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(raw) if raw.strip() else ""
            return
        sub = _dataclass_of(field_type) if schema is not None else None
        if schema is not None and sub is None and not _is_mapping_type(field_type):
            raise ConfigError(f"config key '{path}' has no sub-keys ({item!r})")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{path}' has no sub-keys ({item!r})")
        node, schema = child, sub


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return a copy of dataclass `cfg` with `key.sub=value` overrides applied.

    Args:
        cfg: a dataclass config.
        overrides: strings like "quantizer.beta=0.5" or "data.paths=[a, b]".
    """
    data = to_dict(cfg)
    for item in overrides:
        set_override(data, type(cfg), item)
    return from_dict(type(cfg), data)


def load_config(cls: type[T], data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> T:
    """Dataclass defaults <- `data` (a parsed yaml, any subset) <- `overrides`; then `cls.resolve_raw` (if any) fills
    in what depends on other keys, and the dataclass is built strictly.

    Args:
        cls: the config dataclass.
        data: nested mapping, or None for an empty file.
        overrides: `key=value` strings.
    """
    raw = copy.deepcopy(dict(data or {}))
    if not isinstance(data or {}, Mapping):
        raise ConfigError(f"a {cls.__name__} config must be a mapping, got {data!r}")
    for item in overrides:
        set_override(raw, cls, item)
    resolve = getattr(cls, "resolve_raw", None)
    if resolve is not None:
        raw = resolve(raw)
    return from_dict(cls, raw)
