"""A command's options made from its settings record.

Every command has one typed settings record: a dataclass of ``core.options.option`` fields
in its stage's light ``settings`` module (``ConvertSettings`` in ``building.settings``,
``ValidateSettings`` in ``judging.settings``…), taken by the one library function the
command calls (``building.convert_command.convert_command``…). A field carries its
type, default, allowed values, description and how it shows on the command line (flag
names, positional argument, list separator). ``options_from`` makes the command's Click
parameters from the record — the type, range, choices, default and help all come from
the field, so a flag and the library cannot disagree — and ``settings_from`` turns the
values Click parsed back into the record, checked by ``core.options.build`` (types,
ranges, the record's own ``validate()`` rules that span several fields: exit 2).

A field whose type is itself a settings dataclass (the gates: ``judging.gates.Gates``) is
flattened: its fields are options of the command, and ``settings_from`` builds it. Only
``--json`` (``cli.group.json_option``: how a command prints, not what it does) is added
by the command itself.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING
from pathlib import Path

import click

from bertexport.core.options import build

SHARED = ("json_out",)  # parameters a command adds itself (cli.group.json_option)


def _unwrap(tp):
    """``X | None`` -> ``X``; anything else as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        if Path in args:
            return Path  # str | Path: a path
        if str in args:
            return str
    return tp


def _is_record(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def fields(cls) -> list[tuple[dataclasses.Field, typing.Any]]:
    """The record's command-line fields with their types, nested records flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _unwrap(hints[f.name])
        if _is_record(tp):
            out.extend(fields(tp))
        else:
            out.append((f, tp))
    names = [f.name for f, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TypeError(f"{cls.__name__}: the same setting twice on the command line: {', '.join(dupes)}")
    return out


def _scalar_type(tp, meta: dict):
    if meta.get("choices"):
        return click.Choice([str(c) for c in meta["choices"]])
    if tp is Path:
        return click.Path(path_type=Path)
    lo, hi = meta.get("min"), meta.get("max")
    if tp is int:
        return click.IntRange(lo, hi, min_open=meta.get("min_open", False), max_open=meta.get("max_open", False)) \
            if lo is not None or hi is not None else int
    if tp is float:
        return click.FloatRange(lo, hi, min_open=meta.get("min_open", False), max_open=meta.get("max_open", False)) \
            if lo is not None or hi is not None else float
    return str


def _separated(inner, sep: str, meta: dict):
    """A callback reading ``2,4`` into ``[2, 4]`` (each part checked like a single value)."""
    kind = click.types.convert_type(_scalar_type(inner, meta))  # int -> click.INT: 'a' is a BadParameter (exit 2)

    def parse(ctx, param, value):
        if value is None:
            return None
        parts = [p.strip() for p in value.split(sep)]
        how = f"takes values separated by {sep!r} (e.g. 2{sep}4), not {value!r}"
        if not all(parts):
            raise click.BadParameter(how)
        try:
            return [kind.convert(p, param, ctx) for p in parts]
        except click.BadParameter as e:
            raise click.BadParameter(f"{how}: {e.message}") from None

    return parse


def _default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _parameter(f: dataclasses.Field, tp):
    meta = dict(f.metadata)
    default = _default(f)
    is_list = typing.get_origin(tp) is list
    inner = _unwrap((typing.get_args(tp) or (str,))[0]) if is_list else tp
    sep = meta.get("separator")
    kw: dict = {}
    if is_list and sep:
        kw.update(type=str, callback=_separated(inner, sep, meta))
        if default not in (MISSING, None):
            default = sep.join(map(str, default))
    elif is_list:
        kw.update(type=_scalar_type(inner, meta), **({} if meta.get("argument") else {"multiple": True}))
        default = tuple(default) if default not in (MISSING, None) else ()
    elif tp is bool:
        kw.update(is_flag=True)
        default = False if default is MISSING else None if default is None else bool(default)  # None: not given
    elif typing.get_origin(tp) is tuple:  # a fixed number of values (``--compare A B``)
        args = typing.get_args(tp)
        kw.update(type=_scalar_type(_unwrap(args[0]), meta), nargs=len(args))
    else:
        kw.update(type=_scalar_type(tp, meta))
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    if meta.get("argument"):
        if is_list and not sep:
            given = {"required": True} if _default(f) is MISSING else {"default": default}
            return click.argument(f.name, nargs=-1, **given, **kw)
        return click.argument(f.name, required=default is MISSING, default=None if default is MISSING else default, **kw)
    flags = meta.get("flag") or ("--" + f.name.replace("_", "-"),)
    if default is MISSING:
        kw["required"] = True
    else:
        kw["default"] = default
        unset = default is None or default is False or default == ()  # not ``in (None, False, ())``: 0 == False
        kw["show_default"] = bool(meta.get("show_default", True)) and not unset
    if meta.get("envvar"):
        kw["envvar"] = meta["envvar"]
    if meta.get("show_envvar"):
        kw["show_envvar"] = True
    if meta.get("flag_value") is not None:  # the value may be left out (``--ray`` alone: ``--ray local``)
        kw.update(is_flag=False, flag_value=meta["flag_value"])
    return click.option(*flags, f.name, help=meta.get("help") or None, **kw)


def options_from(cls):
    """A decorator: the command's Click parameters, one per field of the settings record
    ``cls`` (in field order), and the record remembered on the command (``settings_of``)."""
    params = [_parameter(f, tp) for f, tp in fields(cls)]

    def decorate(fn):
        for p in reversed(params):
            fn = p(fn)
        fn.__settings__ = cls
        return fn

    return decorate


def settings_of(command: click.Command):
    """The settings record a command's options were made from (None: none)."""
    return getattr(command.callback, "__settings__", None)


def _collect(cls, values: dict):
    hints = typing.get_type_hints(cls)
    table = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _unwrap(hints[f.name])
        if _is_record(tp):
            table[f.name] = build(tp, _collect(tp, values), cls.__name__)
        elif f.name in values:
            v = values[f.name]
            table[f.name] = list(v) if isinstance(v, tuple) else v
    return table


def settings_from(cls, values: dict, where: str | None = None):
    """The settings record from the values Click parsed (``values``: the command's keyword
    arguments; ``--json`` and other shared ones are left out), checked: a value out of its
    range or a rule of the record's ``validate()`` is a ``UserError`` (exit 2)."""
    return build(cls, _collect(cls, values), where or cls.__name__)
