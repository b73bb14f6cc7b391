"""Typed configuration: frozen dataclasses checked field by field, built from TOML tables.

Every config of the package is a frozen dataclass whose ``__post_init__`` calls
:func:`check_types` (each field against its annotation) before checking ranges.
:func:`from_table` builds one from a TOML table, refusing unknown keys with a
"did you mean"; :func:`apply_overrides` applies ``--set section.key=value``
edits to nested tables before anything is built, so a mistake is one line and
no work has started.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

from illusion_probe.errors import IllusionProbeError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

C = TypeVar("C")


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind))
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
            item, _describe(item))
    if origin is typing.Literal:
        return " or ".join(repr(v) for v in typing.get_args(kind))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "none"}.get(kind, getattr(kind, "__name__", str(kind)))


def _matches(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return any(_matches(value, k) for k in typing.get_args(kind))
    if origin is typing.Literal:
        return value in typing.get_args(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, k) for v, k in zip(value, args, strict=True))
    if kind is Any:
        return True
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is type(None):
        return value is None
    return isinstance(value, kind) if isinstance(kind, type) else True


def _finite(value: Any) -> bool:
    """False for a NaN or infinite float, also inside a tuple."""
    if isinstance(value, tuple):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def check_types(config: Any) -> None:
    """Raise a one-line error naming the first field of dataclass ``config`` whose value has the wrong type
    or is a NaN or infinite number (which no setting means, and which would only fail after the work).

    Lists given for tuple fields (as JSON and TOML give them) are stored as tuples first, so a frozen
    config stays hashable and comparable.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = _tuples(getattr(config, f.name))
        object.__setattr__(config, f.name, value)
        if not _matches(value, hints[f.name]):
            raise IllusionProbeError(f"{type(config).__name__}.{f.name} must be {_describe(hints[f.name])}, "
                                     f"got {value!r}")
        if not _finite(value):
            raise IllusionProbeError(f"{type(config).__name__}.{f.name} must be a finite number, got {value!r}; "
                                     "give an ordinary number")


def _tuples(value: Any) -> Any:
    """TOML arrays as tuples (nested too), so frozen configs stay hashable and comparable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def from_table(cls: type[C], table: Any, where: str) -> C:
    """An instance of dataclass ``cls`` from a TOML table; unknown keys are a one-line error."""
    if not isinstance(table, Mapping):
        raise IllusionProbeError(f"{where}: expected a table of settings, got {table!r}")
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            raise IllusionProbeError(f"{where}: unknown setting {key!r}; {hint}")
    return cls(**{key: _tuples(value) for key, value in table.items()})


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as nested dicts; a missing or malformed file is a one-line error."""
    file = Path(path)
    if not file.is_file():
        raise IllusionProbeError(f"config file {file} not found; give the path of a TOML file")
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise IllusionProbeError(f"config file {file} is not valid TOML ({err}); fix the file") from None


def parse_value(text: str) -> Any:
    """``--set`` values are TOML values (``1e-3``, ``true``, ``[1, 2]``, ``"x"``); anything else is a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(tables: dict[str, Any], overrides: Sequence[str], sections: Sequence[str]) -> dict[str, Any]:
    """A copy of ``tables`` with each ``section.key=value`` override applied (``section`` among ``sections``)."""
    out = {name: dict(table) if isinstance(table, Mapping) else table for name, table in tables.items()}
    for item in overrides:
        path, sep, text = item.partition("=")
        section, dot, key = path.strip().partition(".")
        if not sep or not dot or not key:
            raise IllusionProbeError(f"--set {item!r}: write section.key=value, e.g. train.lr=1e-3")
        if section not in sections:
            close = difflib.get_close_matches(section, list(sections), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"sections: {', '.join(sections)}"
            raise IllusionProbeError(f"--set {item!r}: unknown section {section!r}; {hint}")
        out.setdefault(section, {})[key.strip()] = parse_value(text.strip())
    return out


def preset_names(kind: str) -> list[str]:
    """Names of the presets shipped for task ``kind`` (``illusion_probe/presets/<kind>_<name>.toml``)."""
    from importlib import resources

    folder = resources.files("illusion_probe") / "presets"
    prefix = f"{kind}_"
    return sorted(p.name[len(prefix):-len(".toml")] for p in folder.iterdir()
                  if p.name.startswith(prefix) and p.name.endswith(".toml"))


def preset_tables(kind: str, name: str) -> dict[str, Any]:
    """The tables of the shipped preset ``name`` for task ``kind``; an unknown name is a one-line error."""
    from importlib import resources

    known = preset_names(kind)
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(known) or '(none)'}"
        raise IllusionProbeError(f"unknown {kind} preset {name!r}; {hint}")
    text = (resources.files("illusion_probe") / "presets" / f"{kind}_{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def task_preset(config_class: type[C], kind: str, name: str) -> C:
    """The ``[task]`` table of a shipped preset as ``config_class`` (what ``DyckConfig.preset`` returns)."""
    table = {k: v for k, v in preset_tables(kind, name).get("task", {}).items() if k != "kind"}
    return from_table(config_class, table, f"preset {kind}/{name} [task]")
