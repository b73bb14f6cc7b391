"""One-hot attention: harden each attention row onto its argmax key.

Data-free; it acts at ``blocks.L.attn.hook_pattern`` ``[batch, head, query, key]``.
Some backends compute attention without reading back an edited pattern
(TransformerLens 3.9 native bridges ignore the edit silently): ``fit_proxy`` and
``evaluate`` ask the model's backend adapter whether edits at a pattern hook
take effect, and refuse the proxy if they do not, rather than report a proxy
that is secretly the clean model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusion_probe.errors import require
from illusion_probe.hook_names import is_attention_pattern
from illusion_probe.registry import register_simplifier
from illusion_probe.simplify.base import Simplifier


@register_simplifier
class OneHotAttention(Simplifier):
    """Replace each attention row of the chosen heads by a one-hot on its argmax.

    Args:
        heads: head indices of the hooked layer to harden; ``None`` hardens all of them.
    """

    method: ClassVar[str] = "onehot_attention"

    def __init__(self, heads: Sequence[int] | None = None):
        if heads is not None:
            heads = sorted(set(heads))
            require(all(isinstance(h, int) and h >= 0 for h in heads) and heads,
                    f"OneHotAttention: heads must be non-negative head indices or None, got {heads!r}")
        self.heads: list[int] | None = heads

    def options(self) -> dict[str, Any]:
        return {"heads": self.heads}

    def describe(self) -> str:
        return "onehot_attention()" if self.heads is None else f"onehot_attention(heads={self.heads})"

    def check_hook(self, hook_name: str) -> None:
        require(is_attention_pattern(hook_name),
                f"OneHotAttention acts on attention patterns (blocks.L.attn.hook_pattern), not {hook_name!r}")

    def check_feature_shape(self, shape: tuple[int, ...]) -> None:
        """``shape`` is ``(head,)`` for a pattern hook: every chosen head must exist."""
        require(self.heads is None or max(self.heads) < shape[0],
                f"{self.describe()}: head index out of range for a layer with {shape[0]} heads")

    def __call__(
        self, act: Float[Tensor, "batch head query key"], hook: Any = None
    ) -> Float[Tensor, "batch head query key"]:
        """The pattern with the chosen heads' rows hardened to one-hot (same shape, dtype, device)."""
        require(act.ndim == 4, f"OneHotAttention expects a [batch, head, query, key] pattern, got {tuple(act.shape)}")
        self.check_feature_shape((act.shape[1],))
        hard = torch.zeros_like(act).scatter_(-1, act.argmax(-1, keepdim=True), 1.0)
        if self.heads is None:
            return hard
        out = act.clone()
        out[:, self.heads] = hard[:, self.heads]
        return out
