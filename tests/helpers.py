"""Helpers shared by test modules (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import torch

from illusion_probe.hook_names import hook_points


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks attached to any HookPoint (aliases share one HookPoint, so count each once)."""
    points = {id(p): p for p in hook_points(model).values()}
    return sum(len(p._forward_hooks) for p in points.values())
