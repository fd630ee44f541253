"""Options declared once: a dataclass field with its help text and its check.

Run settings (:mod:`jaxpeft.config`), the compute spec (:mod:`jaxpeft.compute`) and every method's
options (:mod:`jaxpeft.methods`) are dataclasses whose fields are declared with :func:`option`.
The command line is built from those fields (one ``--flag`` each, :func:`add_flags`), and
:func:`check` runs each field's check where the dataclass is built, so a value out of range is one
error naming the flag and the range:

>>> import dataclasses
>>> @dataclasses.dataclass
... class Opt:
...     lr: float = option(1e-3, "peak learning rate", positive)
...     def __post_init__(self):
...         check(self)
>>> Opt(lr=-1.0)
Traceback (most recent call last):
...
jaxpeft.errors.UserError: --lr=-1.0: must be > 0
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Iterable

from jaxpeft.errors import UserError

Check = Callable[[Any], str | None]   # returns why the value is wrong, or None


def option(default: Any, help: str, check: Check | None = None, choices: tuple | None = None,
           **meta: Any) -> Any:
    """A dataclass field that is a command-line option (``meta``: more metadata for its owner)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "choices": choices,
                                                        **meta})


def positive(v: Any) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else "must be >= 0"


def at_least(lo: float) -> Check:
    return lambda v: None if v is None or v >= lo else f"must be >= {lo}"


def in_range(lo: float, hi: float, hi_open: bool = False) -> Check:
    """``lo <= v <= hi`` (``< hi`` with ``hi_open``)."""
    def chk(v):
        ok = v is None or (lo <= v < hi if hi_open else lo <= v <= hi)
        return None if ok else f"must be in [{lo}, {hi}{')' if hi_open else ']'}"
    return chk


def check(obj: Any) -> None:
    """Runs the checks and choices of every field of the dataclass ``obj``."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and v is not None and v not in choices:
            raise UserError(f"--{f.name}={show(v)}: choose one of {', '.join(show(c) for c in choices)}")
        chk = f.metadata.get("check")
        why = chk(v) if chk is not None else None
        if why:
            raise UserError(f"--{f.name}={show(v)}: {why}")


def show(v: Any) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def field_type(cls: type, name: str) -> type:
    """The plain type of field ``name`` (``int | None`` -> ``int``)."""
    t = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType) and args:
        return args[0]
    return t


def parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _none_or(kind):
    def parse(s: str):
        return None if s.strip().lower() in ("", "none", "null") else kind(s)
    parse.__name__ = kind.__name__
    return parse


def add_flags(parser: argparse._ActionsContainer, cls: type, skip: Iterable[str] = (),
              defaults: Any = None) -> list[str]:
    """One ``--flag`` per field of the dataclass ``cls`` (bools as ``--flag/--no-flag``); returns
    the names added. Absent flags stay absent from the parsed namespace (``argparse.SUPPRESS``)."""
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind = field_type(cls, f.name)
        default = getattr(defaults, f.name) if defaults is not None else f.default
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        text = f"{help_} (default: {show(default) if default is not dataclasses.MISSING else '-'})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=text,
                                default=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{f.name}", type=_none_or(kind), default=argparse.SUPPRESS,
                                metavar="|".join(map(show, choices)) if choices else kind.__name__.upper(),
                                help=text)
        added.append(f.name)
    return added


def coerce(cls: type, name: str, value: Any) -> Any:
    """``value`` (from a config file) as field ``name``'s type where that is unambiguous."""
    kind = field_type(cls, name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, str):
        return parse_bool(value)
    return value
