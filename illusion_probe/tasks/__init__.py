"""Tasks: Dyck bracket languages and character-level code completion."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from illusion_probe.errors import IllusionProbeError
from illusion_probe.tasks.base import Split, SplitSet, Task

#: task kind -> (module, task class, config class)
_TASKS = {
    "dyck": ("illusion_probe.tasks.dyck", "DyckTask", "DyckConfig"),
    "code": ("illusion_probe.tasks.code", "CodeTask", "CodeConfig"),
}


def task_from_dict(data: dict[str, Any]) -> Task:
    """Rebuild a task from :meth:`Task.to_dict` output.

    ``data`` may also name a ``preset`` of the task's config class, which ``config`` then overrides.
    """
    kind = data.get("kind")
    if kind not in _TASKS:
        raise IllusionProbeError(f"unknown task kind {kind!r}; known: {', '.join(_TASKS)}")
    module_name, task_name, config_name = _TASKS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise IllusionProbeError(f"task kind {kind!r} is not available in this illusion-probe version") from None
    config = dict(data.get("config") or {})
    if data.get("preset") is not None:
        config = {**dataclasses.asdict(getattr(module, config_name).preset(data["preset"])), **config}
    return getattr(module, task_name).from_config_dict(config)


__all__ = ["Split", "SplitSet", "Task", "task_from_dict"]
