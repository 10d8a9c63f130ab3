"""Typed option records: the settings of a profile table, a pass or a backend runtime are
plain dataclasses whose fields carry a description and their allowed values
(``option(default, "what it does", min=..., choices=...)``). ``build`` makes one from a
TOML table, refusing unknown keys, wrong types and out-of-range values with a message
that names the table and the key; ``describe`` lists the options for people
(``bertexport targets --describe``) and for a search that reads what a step can take."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING
from typing import Any

from bertexport.core.errors import UserError


def option(default: Any = MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
           min_open: bool = False, max_open: bool = False, choices: tuple | None = None, default_factory: Any = MISSING,
           flag: str | tuple[str, ...] | None = None, argument: bool = False, metavar: str | None = None,
           separator: str | None = None, envvar: str | None = None, show_default: bool = True,
           show_envvar: bool = False, flag_value: Any = None):
    """A dataclass field with a description and its allowed values. ``min_open``/``max_open``
    make a bound exclusive (``(0, 1]``).

    The rest say how a command's settings record (``bertexport.cli.settings``) shows the
    field on the command line: ``flag`` (its names, the first the main one; default
    ``--field-name``), ``argument`` (a positional argument instead), ``metavar``, ``envvar``,
    ``separator`` (a list typed as one value, e.g. ``2,4`` with ``","``; without it a list
    field is a repeatable option), ``show_default``, ``show_envvar`` and ``flag_value`` (an
    option whose value may be left out, taking this one: ``--ray`` alone is ``--ray local``)."""
    meta = {"help": help, "min": min, "max": max, "min_open": min_open, "max_open": max_open,
            "choices": tuple(choices) if choices else None, "flag": (flag,) if isinstance(flag, str) else flag,
            "argument": argument, "metavar": metavar, "separator": separator, "envvar": envvar,
            "show_default": show_default, "show_envvar": show_envvar, "flag_value": flag_value}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg).removeprefix('a ').removeprefix('an ')}s"
    if tp is type(None):
        return "none"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a table"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, path: str):
    """``value`` checked against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except TypeError:
                continue
        raise TypeError(f"{path} must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise TypeError(f"{path} must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # a fixed number of values
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TypeError(f"{path} must be {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{path} must be a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{path} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{path} must be a table, got {value!r}")
        return build(tp, value, path)
    return value


def _check_range(name: str, value, meta: dict, path: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices:
        vals = value if isinstance(value, list) else [value]
        bad = [v for v in vals if v not in choices]
        if bad:
            raise ValueError(f"{path} must be one of {', '.join(map(str, choices))}, got {bad[0]!r}")
    if isinstance(value, (list, tuple)):  # every value of a list in range, as on the command line
        for i, v in enumerate(value):
            _check_range(name, v, {**meta, "choices": None}, f"{path}[{i}]")
        return
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value <= lo if meta.get("min_open") else value < lo):
            raise ValueError(f"{path} must be {'>' if meta.get('min_open') else '>='} {lo}" +
                             (f" and <= {hi}" if hi is not None else "") + f", got {value!r}")
        if hi is not None and (value >= hi if meta.get("max_open") else value > hi):
            raise ValueError(f"{path} must be {'<' if meta.get('max_open') else '<='} {hi}, got {value!r}")


def build(cls, values: dict | None, where: str):
    """An instance of the dataclass ``cls`` from a table, fully checked; ``UserError``
    (exit 2) names ``where`` and the key on any problem. A ``validate()`` method on the
    class runs last for rules that span several fields."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields) or 'none'}")
    kwargs = {}
    try:
        for name, value in values.items():
            path = f"{where}.{name}"
            v = _coerce(value, hints[name], path)
            _check_range(name, v, dict(fields[name].metadata), path)
            kwargs[name] = v
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if validate:
            validate()
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(where) else f"{where}: {msg}") from e
    return obj


def describe(cls) -> list[dict]:
    """One row per option: name, type, default, allowed values, description."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = dict(f.metadata)
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        allowed = ""
        if meta.get("choices"):
            allowed = " | ".join(map(str, meta["choices"]))
        elif meta.get("min") is not None or meta.get("max") is not None:
            lo = meta.get("min")
            allowed = (("(" if meta.get("min_open") else "[") + ("-inf" if lo is None else f"{lo}") + ", " +
                       ("inf)" if meta.get("max") is None else f"{meta['max']}" + (")" if meta.get("max_open") else "]")))
        rows.append({"name": f.name, "type": _type_name(hints[f.name]).replace("a list of", "list of").removeprefix("an ").removeprefix("a "),
                     "default": default if not dataclasses.is_dataclass(default) else dataclasses.asdict(default),
                     "allowed": allowed, "help": meta.get("help", "")})
    return rows

