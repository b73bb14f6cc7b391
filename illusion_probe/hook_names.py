"""One hook-name resolver for the whole package.

Accepts legacy names (``blocks.1.attn.hook_k``) and canonical bridge names
(``blocks.1.attn.k.hook_out``) alike. On a ``TransformerBridge`` a legacy name
is an alias: the ``hook.name`` a callback receives is the canonical one, so
fitted state is keyed by the name the *user* gave, never by ``hook.name``.
"""

from __future__ import annotations

import difflib
import re

import torch

from illusion_probe.errors import IllusionProbeError

_PER_HEAD = re.compile(r"(^|\.)(hook_[qkvz]|[qkv]\.hook_out|o\.hook_in)$")
_ATTENTION_PATTERN = re.compile(r"(^|\.)hook_pattern$")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def hook_points(model: torch.nn.Module) -> dict[str, object]:
    """Every hook name the model accepts (legacy aliases included) mapped to its HookPoint."""
    hook_dict = getattr(model, "hook_dict", None)
    if not isinstance(hook_dict, dict):
        raise IllusionProbeError(f"{type(model).__name__} has no hook_dict; pass a TransformerLens hooked model")
    return hook_dict


def resolve_hook_name(model: torch.nn.Module, name: str) -> str:
    """The canonical name of hook ``name`` on ``model``, or an error listing the closest valid names."""
    points = hook_points(model)
    if not isinstance(name, str) or name not in points:
        close = difflib.get_close_matches(str(name), list(points), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise IllusionProbeError(f"unknown hook name {name!r} on {type(model).__name__}{hint}")
    return getattr(points[name], "name", None) or name


def is_per_head(name: str) -> bool:
    """True for per-head activations ``[batch, pos, head, d_head]`` (``hook_q/k/v/z`` and bridge twins)."""
    return bool(_PER_HEAD.search(name))


def is_attention_pattern(name: str) -> bool:
    """True for ``hook_pattern``, the post-softmax attention ``[batch, head, query, key]``."""
    return bool(_ATTENTION_PATTERN.search(name))


def layer_of(name: str) -> int | None:
    """The block index a hook belongs to (``blocks.L.…``), or ``None`` for embed/unembed hooks."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None
