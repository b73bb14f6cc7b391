"""Tasks: Dyck bracket languages and character-level code completion."""

from __future__ import annotations

import importlib
from typing import Any

from illusion_probe.errors import IllusionProbeError
from illusion_probe.tasks.base import Split, SplitSet, Task

_TASK_CLASSES = {
    "dyck": "illusion_probe.tasks.dyck:DyckTask",
    "code": "illusion_probe.tasks.code:CodeTask",
}


def task_from_dict(data: dict[str, Any]) -> Task:
    """Rebuild a task from :meth:`Task.to_dict` output."""
    kind = data.get("kind")
    if kind not in _TASK_CLASSES:
        raise IllusionProbeError(f"unknown task kind {kind!r}; known: {', '.join(_TASK_CLASSES)}")
    module_name, class_name = _TASK_CLASSES[kind].split(":")
    try:
        task_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise IllusionProbeError(f"task kind {kind!r} is not available in this illusion-probe version") from None
    return task_class.from_config_dict(dict(data.get("config", {})))


__all__ = ["Split", "SplitSet", "Task", "task_from_dict"]
