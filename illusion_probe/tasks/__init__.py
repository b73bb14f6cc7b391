"""Tasks: Dyck bracket languages and character-level code completion, registered by ``kind``.

Importing this package registers the built-in tasks; ``@ip.register_task`` adds a user's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from illusion_probe.errors import IllusionProbeError
from illusion_probe.registry import TASKS
from illusion_probe.tasks import code, dyck  # noqa: F401 - registers the built-in tasks
from illusion_probe.tasks.base import Split, SplitSet, Task


def task_from_dict(data: dict[str, Any]) -> Task:
    """Rebuild a task from :meth:`Task.to_dict` output (``{"kind": ..., "config": {...}}``)."""
    if not isinstance(data, dict):
        raise IllusionProbeError(f"a task description must be an object with 'kind' and 'config', got {data!r}")
    task_class = TASKS.get(data.get("kind"))
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise IllusionProbeError(f"task {data.get('kind')!r}: 'config' must be an object, got {config!r}")
    return task_class.from_config_dict(config)


def task_config_fields(kind: str) -> list[str]:
    """The config fields of the registered task ``kind``."""
    return [f.name for f in dataclasses.fields(TASKS.get(kind).config_class)]


__all__ = ["Split", "SplitSet", "Task", "task_from_dict"]
