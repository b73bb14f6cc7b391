"""Ablation baselines: the activation replaced by zeros, or by its training mean.

They anchor the CE-loss score (0 = as bad as ablating the hook) and are the
"rank 0" end of every sweep.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from illusion_probe.distributed import all_reduce
from illusion_probe.registry import register_simplifier
from illusion_probe.simplify.base import FittedSimplifier, Simplifier


@register_simplifier
class ZeroAblation(Simplifier):
    """Replace the activation by zeros (data-free; works at any hook)."""

    method: ClassVar[str] = "zero_ablation"

    def check_hook(self, hook_name: str) -> None:
        return None

    def __call__(self, act: Tensor, hook: Any = None) -> Tensor:
        """Zeros of ``act``'s shape, dtype and device."""
        return torch.zeros_like(act)


@register_simplifier
class MeanAblation(FittedSimplifier):
    """Replace the activation by its mean over the fitted samples (per head with ``per_head=True``)."""

    method: ClassVar[str] = "mean_ablation"

    def start(self, shape: tuple[int, int], device: torch.device) -> None:
        self._sum = torch.zeros(shape, dtype=torch.float64, device=device)

    def accumulate(self, x: Tensor) -> None:
        self._sum += x.to(torch.float64).sum(dim=0)

    def combine_accumulators(self) -> None:
        all_reduce(self._sum)

    def drop_accumulators(self) -> None:
        vars(self).pop("_sum", None)

    def finish(self) -> None:
        self.mean = (self._sum / self._n_seen).to(torch.float32)
        del self._sum

    def tensors(self) -> dict[str, Tensor]:
        return {"mean": self.mean}

    def state_shapes(self, group: int, feature: int) -> dict[str, tuple[int, ...]]:
        return {"mean": (group, feature)}

    def set_tensors(self, state: dict[str, Tensor]) -> None:
        self.mean = state["mean"]

    def apply(self, x: Tensor) -> Tensor:
        return self.derived(x)["mean"].expand_as(x).clone()
