"""Typed configuration: YAML files loaded into dataclasses, validated once, at the edge.

A config file is a YAML mapping with one section per component. It may name one or more base files
(`base: ../base.yaml` or a list), resolved relative to the file itself and merged first, so recipes share
a base. Command-line overrides are dotted `key=value` pairs whose values are parsed as YAML
(`optim.lr=5e-4 model.depths=[1,1,1,1,1]`).

Every field of every section is a dataclass field whose metadata carries a one-line `doc` and, where
it applies, `min`/`max`. Loading rejects, with one line naming the key and where it came from:
an unknown key (with a suggestion), a value of the wrong type, a value out of range, a missing file.

This module knows nothing about the trainer; `pretrain.config` declares the sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config that cannot be used. The message is one line that names the key and its source."""


def doc(
    text: str,
    default: Any = dataclasses.MISSING,
    *,
    min: float | None = None,
    max: float | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field carrying its documentation and allowed range (used by the loader and the docs)."""
    meta = {"doc": text}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------- reading


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read a config file and its bases; return the merged tree and, per dotted key, the file it came from."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"{path}: circular 'base' chain: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")

    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: must be a file name or a list of file names")

    tree: dict = {}
    origin: dict[str, str] = {}
    for base in bases:
        base_tree, base_origin = read_yaml_tree(path.parent / base, (*_seen, path))
        merge_into(tree, base_tree, origin, base_origin)
    merge_into(tree, data, origin, _origins_of(data, str(path)))
    return tree, origin


def _origins_of(tree: Mapping, source: str, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out[dotted] = source
        if isinstance(value, Mapping):
            out.update(_origins_of(value, source, dotted + "."))
    return out


def merge_into(tree: dict, update: Mapping, origin: dict[str, str], update_origin: Mapping[str, str]) -> None:
    """Deep-merge `update` into `tree` (mappings merge, everything else replaces) and record origins."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(tree.get(key), dict):
            merge_into(tree[key], value, origin, {})
        else:
            tree[key] = dict(value) if isinstance(value, Mapping) else value
    origin.update(update_origin)


def parse_overrides(overrides: Sequence[str]) -> tuple[dict, dict[str, str]]:
    """`['optim.lr=5e-4', 'data.batch_size=64']` -> nested dict, values parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{COMMAND_LINE}: override {item!r} is not of the form section.key=value")
        if not raw.strip():
            # `model=` from an unset shell variable would silently reset a whole section or key.
            raise ConfigError(
                f"{COMMAND_LINE}: override {item!r} has no value (write {key}=null to unset it)"
            )
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{COMMAND_LINE}: override {item!r} conflicts with another override")
        node[leaf] = value
    return tree, {key.partition("=")[0]: COMMAND_LINE for key in overrides}


# ---------------------------------------------------------------------------------------------- building


def build(cls: type[T], tree: Mapping, origin: Mapping[str, str], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested mapping, checking keys, types and ranges."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    where = _source(origin, prefix.rstrip(".")) if prefix else "config"
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where}: {prefix.rstrip('.')} must be a mapping, got {type(tree).__name__}")
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{_source(origin, dotted)}: unknown key '{dotted}'{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value if value is not None else {}, origin, dotted + ".")
        else:
            kwargs[key] = _check_value(value, hint, fields[key].metadata, dotted, origin)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field was not given
        raise ConfigError(f"{where}: {exc}") from None


def _source(origin: Mapping[str, str], dotted: str) -> str:
    while dotted:
        if dotted in origin:
            return origin[dotted]
        dotted = dotted.rpartition(".")[0]
    return "config"


def _check_value(value: Any, hint: Any, meta: Mapping, dotted: str, origin: Mapping[str, str]) -> Any:
    try:
        value = _coerce(value, hint)
    except _Mismatch:
        raise ConfigError(
            f"{_source(origin, dotted)}: {dotted} must be {_type_name(hint)}, got {value!r}"
        ) from None
    for bound, ok in (("min", lambda v, b: v >= b), ("max", lambda v, b: v <= b)):
        if bound in meta and value is not None:
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, (int, float)) and not ok(v, meta[bound]) for v in items):
                raise ConfigError(
                    f"{_source(origin, dotted)}: {dotted}={value!r} is out of range ({bound} {meta[bound]!r})"
                )
    return value


class _Mismatch(Exception):
    pass


def _coerce(value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if value in get_args(hint) and type(value) in {type(a) for a in get_args(hint)}:
            return value
        raise _Mismatch
    if origin in (list, tuple):
        (item,) = get_args(hint)[:1]
        if not isinstance(value, list):
            raise _Mismatch
        return [_coerce(v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        # PyYAML reads `1e-3` (no dot) as a string; accept anything float() reads, except bools.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config field type {hint!r}")  # a bug in a section, not user input


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in get_args(hint) if a is not type(None)]
        optional = type(None) in get_args(hint)
        return " or ".join(names) + (" or null" if optional else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(hint)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


# ---------------------------------------------------------------------------------------------- writing


def to_tree(obj: Any) -> Any:
    """Dataclass -> plain nested dict/list/scalars (what the YAML dump and MLflow params use)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_tree(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_tree(v) for v in obj]
    return obj


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_tree(obj), sort_keys=False, default_flow_style=None)


def field_docs(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every field, recursively, in declaration order."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        text = f.metadata.get("doc", "")
        bounds = [f"{b} {f.metadata[b]}" for b in ("min", "max") if b in f.metadata]
        if bounds:
            text += f" [{', '.join(bounds)}]"
        rows.append(
            (
                f"{prefix}{f.name}",
                _type_name(hint),
                yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip(),
                text,
            )
        )
    return rows
