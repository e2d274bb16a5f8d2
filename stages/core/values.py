"""Typed settings: value coercion and range checks shared by config sections and by the
options of registered classes (a loss's or a model's constructor).

A setting's annotation may carry a constraint, ``Annotated[float, Range(min=0)]`` or
``Annotated[str, OneOf("flat", "hnsw", "ivf")]``; a value outside it is an error that says
what is allowed.
"""

import contextlib
import types
import typing
from dataclasses import dataclass

from stages.core.errors import UserError


@dataclass(frozen=True)
class Range:
    """Allowed numeric interval; ``None`` leaves a side open. ``min_open``: min excluded."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False

    def check(self, value) -> str | None:
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return f"{'>' if self.min_open else '>='} {self.min}"
        if self.max is not None and value > self.max:
            return f"<= {self.max}"
        return None

    def describe(self) -> str:
        low = "" if self.min is None else f"{'>' if self.min_open else '>='} {self.min}"
        high = "" if self.max is None else f"<= {self.max}"
        return " and ".join(t for t in (low, high) if t)


@dataclass(frozen=True)
class OneOf:
    """Allowed values of a string setting."""

    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", tuple(values))

    def check(self, value) -> str | None:
        return None if value in self.values else f"one of {', '.join(map(str, self.values))}"

    def describe(self) -> str:
        return f"one of {', '.join(map(str, self.values))}"


def split_annotation(hint) -> tuple[type, object]:
    """``Annotated[T, constraint]`` -> (T, constraint); ``T | None`` -> T; T -> (T, None)."""
    constraint = None
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extras = typing.get_args(hint)
        constraint = extras[0] if extras else None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return hint, constraint


def check_value(value, target: type, constraint, key: str, source: str):
    """``value`` as ``target`` (YAML strings like '5e-4' are parsed), within ``constraint``."""
    target, extra = split_annotation(target)
    constraint = constraint or extra
    ok = False
    if target is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.lower() in ("true", "1", "yes")
        elif type(value) is int and value in (0, 1):  # FOLD5=1 on a make command line
            value = bool(value)
        ok = isinstance(value, bool)
    elif target is int:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif target is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and value == value and abs(value) != float("inf"))
        value = float(value) if ok else value
    elif target is str:
        ok = value is not None and not isinstance(value, (dict, list))
        value = str(value) if ok else value
    if not ok:
        name = getattr(target, "__name__", str(target))
        kind = "a finite float" if target is float else name
        raise UserError(f"{source}: {key} must be {kind}, got {value!r}")
    if constraint is not None and (problem := constraint.check(value)) is not None:
        raise UserError(f"{source}: {key} must be {problem}, got {value!r}")
    return value
