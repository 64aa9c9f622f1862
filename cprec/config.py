"""Typed configuration: dataclasses filled from YAML files and `key=value` overrides.

Every stage's config is a dataclass. Loading checks every key against the dataclass: an unknown key or a
value of the wrong type is an error naming the key path and the file, so a typo never silently falls back
to a default.

A float key also takes a decimal number written as a string, such as `1e-4`, `3E-5` or `.5e-3`: YAML 1.1
(PyYAML) reads an exponent without a dot as a string, so `schedule.peak_lr=1e-4` would otherwise be
refused. Only float keys do this, and only for plain decimals (not `nan` or `inf`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # what a float key takes as a string


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float) or a float
    key's value is a decimal string (see the module docstring)."""
    org = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if org in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, origin)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{origin}: '{key}' may not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, origin, prefix=key + ".")
    if org in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{origin}: '{key}' must be a list, got {type(value).__name__}: {value!r}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if org is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: '{key}' must be a mapping, got {type(value).__name__}")
        k_tp, v_tp = args if args else (Any, Any)
        return {_coerce(k, k_tp, f"{key}.<key>", origin): _coerce(v, v_tp, f"{key}.{k}", origin)
                for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value):
            return float(value)  # 1e-4: YAML 1.1 reads an exponent without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{origin}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{origin}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{origin}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{origin}: '{key}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{origin}: '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, origin: str = "config", prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{origin}: unknown key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(value, hints[name], prefix + name, origin) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{origin}: {exc}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def field_value(cls: type, name: str, value: Any, origin: str = "config") -> Any:
    """`value` checked as `from_dict` checks `cls`'s field `name` (the same conversions and errors), for a
    field read before the whole config is built."""
    return _coerce(value, typing.get_type_hints(cls)[name], name, origin)


def check_seed(seed: int, key: str = "seed") -> None:
    """Seeds feed numpy's and torch's generators, which take whole numbers from 0 to 2**32 - 1 (numpy) only."""
    if not 0 <= seed < 2 ** 32:
        raise ConfigError(f"{key} must be a whole number from 0 to {2 ** 32 - 1} (numpy's seeds), got {seed}")


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _yaml_error(where: str, exc: yaml.YAMLError, of: str = "") -> str:
    """`where`: not valid YAML at line L, column C `of`: what the parser found (and the construct it was in)."""
    mark, context_mark = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    text = f"{where}: not valid YAML"
    if mark is not None:
        text += f" at line {mark.line + 1}, column {mark.column + 1}{of}"
    text += f": {getattr(exc, 'problem', None) or exc}"
    if getattr(exc, "context", None):
        text += f" ({exc.context}"
        if context_mark is not None:
            text += f" started at line {context_mark.line + 1}, column {context_mark.column + 1}"
        text += ")"
    return text


def parse_overrides(pairs: list[str]) -> dict:
    """Turn ['a.b=3', 'c=[x, y]'] into a nested dict; values are parsed as YAML scalars or lists.

    A later override of the same key wins. Overrides that make a key both a value and a mapping (`input=x`
    with `input.items=y`, in either order) clash: an error naming both, as neither can win.
    """
    out: dict = {}
    setters: dict[tuple, str] = {}  # key path -> the override that set it, to name both sides of a clash
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' must look like key=value")
        key, raw = pair.split("=", 1)
        path = tuple(key.strip().split("."))
        value = _override_value(pair, raw)
        node = out
        for depth in range(1, len(path)):
            node = node.setdefault(path[depth - 1], {})
            if not isinstance(node, dict):  # set to a value by an earlier override, or inside one's mapping
                earlier = next(setters[path[:d]] for d in range(depth, 0, -1) if path[:d] in setters)
                raise _clash(earlier, pair, path[:depth])
        if isinstance(node.get(path[-1]), dict) and not isinstance(value, dict):
            earlier = next(p for k, p in setters.items() if k[:len(path)] == path)
            raise _clash(earlier, pair, path)
        node[path[-1]] = value
        setters[path] = pair
    return out


def _override_value(pair: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(f"override '{pair}'", exc, " of the value") + "; the value is read as "
                          "YAML: fix it, or quote it (in a shell: key='\"a: b\"')") from None


def _clash(earlier: str, later: str, path: tuple) -> ConfigError:
    return ConfigError(f"overrides '{earlier}' and '{later}' clash: one gives '{'.'.join(path)}' a value, the other "
                       f"a key under it; keep one of them")


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _config_file(path: Path) -> Path:
    """`path`, or for a relative path missing here the shipped file of that name (`launch/configs/sft.yaml`
    from an installed wheel, run outside a checkout)."""
    if path.is_file():
        return path
    if not path.is_absolute():
        from cprec import resources
        from cprec.errors import CPRecError

        try:
            return resources.shipped_file(str(path))
        except CPRecError:
            pass
    raise ConfigError(f"config file not found: {path}")


def read_config_file(path: str | Path) -> tuple[Path, dict]:
    """(the file found for `path` (`_config_file`), its YAML mapping); errors name the file and line."""
    path = _config_file(Path(path))
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(str(path), exc) + "; fix the file") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return path, loaded


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Any:
    """Load `cls` from optional defaults `base`, a YAML file, then `key=value` overrides (later wins)."""
    data: dict = dict(base or {})
    origin = "defaults"
    if path is not None:
        path, loaded = read_config_file(path)
        data = deep_merge(data, loaded)
        origin = str(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        origin += " + command-line overrides"
    return from_dict(cls, data, origin)
