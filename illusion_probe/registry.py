"""Name -> class registries: how simplifiers, tasks and metrics plug in.

A registry maps a name to a class. Classes join with a decorator
(``@ip.register_simplifier``, ``@ip.register_task``, ``@ip.register_metric``)
that reads the name from a class attribute and refuses a name taken by another
class. Built-in classes register the same way, when the module that holds them
is imported; a registry imports its built-in package the first time it is
asked for a name, so ``import illusion_probe`` stays free of work.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from illusion_probe.errors import IllusionProbeError

T = TypeVar("T", bound=type)


class UnknownNameError(IllusionProbeError, KeyError):
    """A name no class is registered under (a one-line message that ``KeyError`` handlers understand too)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Classes registered under names.

    Args:
        kind: what is registered, for messages (``"simplifier"``).
        name_attribute: the class attribute holding a class's name (``"method"``).
        builtins: module whose import registers the built-in classes.
    """

    def __init__(self, kind: str, name_attribute: str, builtins: str):
        self.kind = kind
        self.name_attribute = name_attribute
        self.builtins = builtins
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: register ``cls`` under ``cls.<name_attribute>``; a name taken by another class raises."""
        name = getattr(cls, self.name_attribute, None)
        if not isinstance(name, str) or not name:
            raise IllusionProbeError(f"register_{self.kind}: {cls.__name__} needs a non-empty string "
                                     f"class attribute {self.name_attribute!r}")
        taken = self._classes.get(name)
        if taken is not None and taken is not cls:
            raise IllusionProbeError(f"register_{self.kind}: the name {name!r} is taken by "
                                     f"{taken.__module__}.{taken.__qualname__}; choose another {self.name_attribute}")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget ``name`` (for tests and interactive sessions)."""
        self._classes.pop(name, None)

    def get(self, name: str, fix: str = "") -> T:
        """The class registered as ``name``; otherwise a one-line error with close names and ``fix``."""
        self._load_builtins()
        if name not in self._classes:
            close = difflib.get_close_matches(str(name), list(self._classes), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; known: {', '.join(self._classes)}"
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}{'; ' + fix if fix else ''}")
        return self._classes[name]

    def names(self) -> list[str]:
        """Every registered name, built-ins first, in registration order."""
        self._load_builtins()
        return list(self._classes)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_builtins(self) -> None:
        importlib.import_module(self.builtins)


#: Simplifier classes by ``method`` (built-ins: :mod:`illusion_probe.simplify`).
SIMPLIFIERS: Registry[type] = Registry("simplifier", "method", "illusion_probe.simplify")
#: Task classes by ``kind`` (built-ins: :mod:`illusion_probe.tasks`).
TASKS: Registry[type] = Registry("task", "kind", "illusion_probe.tasks")
#: Metric classes by ``name`` (built-ins: :mod:`illusion_probe.metrics`).
METRICS: Registry[type] = Registry("metric", "name", "illusion_probe.metrics")

register_simplifier = SIMPLIFIERS.register
register_task = TASKS.register
register_metric = METRICS.register
