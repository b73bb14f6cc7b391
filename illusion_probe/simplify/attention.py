"""One-hot attention: harden each attention row onto its argmax key.

Data-free; it acts at ``blocks.L.attn.hook_pattern`` ``[batch, head, query,
key]``. Some backends compute attention without reading back an edited
pattern (TransformerLens 3.9 native bridges ignore the edit silently), so
:meth:`OneHotAttention.check_model` probes the model once per hook: it zeroes
the pattern on a tiny input and checks that ``hook_z`` (pattern @ values)
becomes zero. If it does not, it raises instead of reporting a proxy that is
secretly the clean model.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.hook_names import is_attention_pattern, layer_of, resolve_hook_name
from illusion_probe.models import model_backend
from illusion_probe.provenance import package_version
from illusion_probe.simplify.base import Simplifier

# model -> {canonical pattern hook: edits take effect}; weak so verdicts die with the model.
_VERDICTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def pattern_edits_take_effect(model: torch.nn.Module, hook_name: str) -> bool:
    """Whether replacing ``hook_name`` (a ``hook_pattern``) changes the head outputs on ``model``. Cached."""
    canonical = resolve_hook_name(model, hook_name)
    verdicts = _VERDICTS.setdefault(model, {})
    if canonical not in verdicts:
        verdicts[canonical] = _probe(model, hook_name)
    return verdicts[canonical]


def _probe(model: torch.nn.Module, hook_name: str) -> bool:
    z_name = f"blocks.{layer_of(hook_name)}.attn.hook_z"
    tokens = (torch.arange(3) % model.cfg.d_vocab).unsqueeze(0).to(model.cfg.device)
    seen: list[Tensor] = []

    def zero_pattern(pattern: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(pattern)

    def capture(z: Tensor, hook: Any) -> None:
        seen.append(z.detach())

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(hook_name, zero_pattern), (z_name, capture)])
    return len(seen) == 1 and not bool(seen[0].any())


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

    def check_model(self, model: torch.nn.Module, hook_name: str) -> None:
        """Raise a one-line error unless edits at ``hook_name`` change ``model``'s computation."""
        self.check_hook(hook_name)
        n_heads = model.cfg.n_heads
        require(self.heads is None or max(self.heads) < n_heads,
                f"{self.describe()}: head index out of range for a model with {n_heads} heads")
        if not pattern_edits_take_effect(model, hook_name):
            raise IllusionProbeError(
                f"OneHotAttention: edits to {hook_name!r} are silently ignored by this model "
                f"(backend {model_backend(model)!r}, TransformerLens {package_version('transformer-lens')}); "
                "use HookedTransformer (backend='hooked') or TransformerLens >= 4.3"
            )

    def __call__(
        self, act: Float[Tensor, "batch head query key"], hook: Any = None
    ) -> Float[Tensor, "batch head query key"]:
        """The pattern with the chosen heads' rows hardened to one-hot (same shape, dtype, device)."""
        require(act.ndim == 4, f"OneHotAttention expects a [batch, head, query, key] pattern, got {tuple(act.shape)}")
        require(self.heads is None or max(self.heads) < act.shape[1],
                f"{self.describe()}: head index out of range for a pattern with {act.shape[1]} heads")
        hard = torch.zeros_like(act).scatter_(-1, act.argmax(-1, keepdim=True), 1.0)
        if self.heads is None:
            return hard
        out = act.clone()
        out[:, self.heads] = hard[:, self.heads]
        return out
