"""Name -> class registries (losses, models), so configs pick implementations by name.

A registered class's *options* are its constructor's keyword parameters that have a default
(their annotations give the type, and optionally a constraint, see :mod:`stages.core.values`);
parameters without a default are supplied by the caller from the data (a model's
``img_dim`` and ``vocab_size``). A config block ``{name: ..., <option>: ...}`` is checked
against the named class's options: an unknown option, or one the chosen class does not take,
is an error that says which classes take it.
"""

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

from stages.core.errors import UserError
from stages.core.values import check_value, split_annotation


@dataclass(frozen=True)
class Option:
    """One constructor option: its type (``int``, ``float``, ``bool``, ``str``), its
    default and its constraint (``None`` or a :class:`stages.core.values.Range`/``OneOf``)."""

    type: type
    default: object
    constraint: object = None


def _options_of(cls: type, preset: dict) -> dict[str, Option]:
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    options = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name in preset or param.default is inspect.Parameter.empty:
            continue
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        hint, constraint = split_annotation(hints.get(name, type(param.default)))
        options[name] = Option(hint, param.default, constraint)
    return options


class Registry:
    """A named table of classes; an unknown name is an error that lists the known ones.

    A class may be registered under several names with preset keyword arguments
    (``vse_max`` and ``vse_sum`` are one hinge loss with ``max_violation`` preset); preset
    arguments are not options of that name.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable] = {}
        self._options: dict[str, dict[str, Option]] = {}

    def register(self, name: str, **preset) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = functools.partial(cls, **preset) if preset else cls
            self._options[name] = _options_of(cls, preset)
            return cls
        return decorator

    @classmethod
    def from_options(cls, kind: str, options: dict[str, dict[str, Option]]) -> "Registry":
        """A registry that knows names and options only (to check configs without
        importing the classes; see :mod:`stages.config.options`): ``build`` is not possible."""
        registry = cls(kind)
        registry._options = options
        return registry

    def check_name(self, name: str) -> None:
        """Refuse an unknown name, listing the known ones."""
        if name not in self._options:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")

    def get(self, name: str) -> Callable:
        self.check_name(name)
        if name not in self._factories:
            raise RuntimeError(f"{self.kind} registry built from cached options cannot "
                               f"build {name!r}")
        return self._factories[name]

    def class_of(self, name: str) -> type:
        """The class behind ``name`` (without its preset arguments)."""
        factory = self.get(name)
        return getattr(factory, "func", factory)

    def options(self, name: str) -> dict[str, Option]:
        """The options (settings) that ``name`` takes, with types and defaults."""
        self.check_name(name)
        return self._options[name]

    def takers(self, option: str) -> list[str]:
        """The registered names that take ``option``."""
        return [n for n in self.names() if option in self._options[n]]

    def resolve(self, name: str, values: dict, source: str) -> dict:
        """Every option of ``name``: the defaults updated with ``values``, each checked.

        An option ``name`` does not take is an error naming the classes that take it.
        """
        options = self.options(name)
        for key in values:
            if key not in options:
                takers = self.takers(key)
                where = (f"; {key} is an option of {', '.join(takers)}" if takers
                         else "")
                raise UserError(f"{source}: {self.kind} {name!r} has no option {key!r}"
                                f"{where}. {name} takes: {', '.join(options) or 'nothing'}")
        resolved = {}
        for key, option in options.items():
            value = values.get(key, option.default)
            resolved[key] = check_value(value, option.type, option.constraint,
                                        f"{self.kind}.{key}", source)
        return resolved

    def build(self, name: str, options: dict, source: str = "config", **data_args):
        """Instantiate ``name`` with checked ``options`` plus the data-derived ``data_args``."""
        return self.get(name)(**self.resolve(name, options, source), **data_args)

    def names(self) -> list[str]:
        return sorted(self._options)

    def options_table(self) -> dict[str, dict[str, Option]]:
        """Every name's options."""
        return dict(self._options)
