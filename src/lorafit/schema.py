"""Typed dataclass configs built from dicts, YAML and ``key=value`` overrides.

One schema serves Python, YAML and the CLI: a config section is a dataclass whose fields carry
their types and defaults; this module turns plain data into those dataclasses, refusing unknown
keys (with the closest valid name suggested) and values of the wrong type (naming the field).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Callable, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")

# First characters of an override value written in YAML flow syntax: a list, a mapping, a quoted string.
FLOW_STARTS = ("[", "{", '"', "'")


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or an empty string."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError("<name> = <value> is invalid: expected <allowed>")`` unless `ok`; the
    `__post_init__` checks of the config dataclasses (`name` is the field's full name)."""
    if not ok:
        raise ConfigError(f"{name} = {value!r} is invalid: expected {allowed}")


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_keys(data: Mapping[str, Any], valid: typing.Iterable[str], where: str) -> None:
    """Raise `ConfigError` for the first key of `data` that is not in `valid`."""
    valid = list(valid)
    for key in data:
        if key not in valid:
            raise ConfigError(
                f"{where}: unknown key {key!r}{suggest(str(key), valid)}; "
                f"valid keys: {', '.join(sorted(valid))}"
            )


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields.

    `where` is the dotted path used in error messages (``"train"`` -> ``"train.lr"``).
    """
    where = where or cls.__name__
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()
    }
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-data (JSON/YAML ready) form of a config dataclass."""
    return dataclasses.asdict(obj)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp`, converting only where the conversion is lossless.

    Strings from the command line (``"2e-4"``, ``"true"``, ``"q_proj,v_proj"``) are parsed into
    the field's type; anything else of the wrong type is refused with the field's dotted name.
    Each kind of type has one converter: `GENERIC_COERCERS` by ``typing.get_origin(tp)``
    (unions, literals, lists, dicts), `SCALAR_COERCERS` by the type itself.
    """
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in GENERIC_COERCERS:
        return GENERIC_COERCERS[origin](value, tp, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp in SCALAR_COERCERS:
        return SCALAR_COERCERS[tp](value, where)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if isinstance(value, str):
        # Members are tried in an order fixed here, not the declared one (typing may hand back
        # a cached equal Union with its members reordered): parsed scalars first ("true" ->
        # bool), then the string itself ("all-linear"), then lists, unless the string is a
        # comma list ("q_proj,v_proj"), which fills a list member first.
        args = sorted(args, key=lambda arg: _string_preference(arg, value))
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: {value!r} fits none of {_type_name(tp)}")


def _string_preference(tp: Any, value: str) -> int:
    if typing.get_origin(tp) in (list, tuple):
        return 0 if "," in value else 2
    return 1 if tp is str else 0


def _coerce_literal(value: Any, tp: Any, where: str) -> Any:
    allowed = typing.get_args(tp)
    for option in allowed:
        if value == option or (isinstance(value, str) and str(option) == value):
            return option
    raise ConfigError(f"{where}: {value!r} is not allowed; expected one of {list(allowed)}")


def _coerce_list(value: Any, tp: Any, where: str) -> list[Any]:
    (item_tp, *_rest) = typing.get_args(tp) or (Any,)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]


def _coerce_dict(value: Any, tp: Any, where: str) -> dict[Any, Any]:
    key_tp, val_tp = typing.get_args(tp) or (Any, Any)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return {coerce(k, key_tp, where): coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected a string, got {value!r}")


# typing.get_origin(tp) -> converter(value, tp, where)
GENERIC_COERCERS: dict[Any, Callable[[Any, Any, str], Any]] = {
    typing.Union: _coerce_union,
    types.UnionType: _coerce_union,
    typing.Literal: _coerce_literal,
    list: _coerce_list,
    tuple: _coerce_list,
    dict: _coerce_dict,
}
# scalar type -> converter(value, where)
SCALAR_COERCERS: dict[type, Callable[[Any, str], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply CLI overrides ``a.b.c=value`` to nested plain `data` (a new dict is returned).

    A value that starts like YAML flow syntax (``[q_proj, v_proj]``, ``{q_proj: 8}``, a quoted
    string) is read as YAML, so it means what the same text means in the config file. Other
    values stay strings here; `from_dict` converts them with the field's declared type.
    """
    result = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=2e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_override_value(value, item)
    return result


def parse_override_value(value: str, item: str) -> Any:
    """`value` of the override `item`: YAML when it starts with one of `FLOW_STARTS`, else the string."""
    if not value.strip().startswith(FLOW_STARTS):
        return value
    import yaml  # only a CLI override in flow syntax needs it: the [train] extra

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: not valid YAML flow syntax ({' '.join(str(exc).split())}); "
                          f"write a list as [a, b], a mapping as {{a: 1}}, and quote a plain string "
                          f"that starts with a bracket or quote") from None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
