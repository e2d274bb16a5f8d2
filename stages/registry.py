"""Name -> factory registries (losses, models), so configs pick implementations by name."""

import functools
import inspect
from collections.abc import Callable

from .errors import UserError


class Registry:
    """A named table of classes; an unknown name is an error that lists the known ones.

    A class may be registered under several names with preset keyword arguments
    (``vse_max`` and ``vse_sum`` are one hinge loss with ``max_violation`` preset).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable] = {}

    def register(self, name: str, **preset) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = functools.partial(cls, **preset) if preset else cls
            return cls
        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._factories:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._factories[name]

    def class_of(self, name: str) -> type:
        """The class behind ``name`` (without its preset arguments)."""
        factory = self.get(name)
        return getattr(factory, "func", factory)

    def build(self, name: str, options: dict):
        """Instantiate ``name`` with the entries of ``options`` that its constructor takes."""
        factory = self.get(name)
        accepted = inspect.signature(factory).parameters
        return factory(**{k: v for k, v in options.items() if k in accepted})

    def names(self) -> list[str]:
        return sorted(self._factories)
