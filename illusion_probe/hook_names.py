"""Hook names: the one place they are built, classified and resolved.

The builders give TransformerLens's legacy names (``blocks.1.attn.hook_k``), which resolve on
``HookedTransformer`` and on every ``TransformerBridge`` alike. On a bridge a legacy name is an
alias: the ``hook.name`` a callback receives is the canonical one (``blocks.1.attn.k.hook_out``),
so fitted state is keyed by the name the *user* gave, never by ``hook.name``. The classifiers
accept both spellings.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch

from illusion_probe.errors import IllusionProbeError

_PER_HEAD = re.compile(r"(^|\.)(hook_[qkvz]|[qkv]\.hook_out|o\.hook_in)$")
_QUERY_OR_KEY = re.compile(r"(^|\.)(hook_[qk]|[qk]\.hook_out)$")
_ATTENTION_PATTERN = re.compile(r"(^|\.)hook_pattern$")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def resid_pre(layer: int) -> str:
    """The residual stream entering block ``layer`` ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_post(layer: int) -> str:
    """The residual stream leaving block ``layer`` ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_resid_post"


def attn_q(layer: int) -> str:
    """Queries of block ``layer`` ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_q"


def attn_k(layer: int) -> str:
    """Keys of block ``layer`` ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_k"


def attn_z(layer: int) -> str:
    """Attention-weighted values of block ``layer`` ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_z"


def attn_pattern(layer: int) -> str:
    """The post-softmax attention pattern of block ``layer`` ``[batch, head, query, key]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def mlp_in(layer: int) -> str:
    """What the MLP of block ``layer`` reads: the normalised residual ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.ln2.hook_normalized"


def mlp_out(layer: int) -> str:
    """What the MLP of block ``layer`` writes to the residual stream ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_mlp_out"


def final_norm_in() -> str:
    """The residual stream after the last block, entering the final norm ``[batch, pos, d_model]`` (bridges only)."""
    return "ln_final.hook_in"


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


def is_query_or_key(name: str) -> bool:
    """True for the queries or keys of a block (``hook_q``, ``hook_k`` and bridge twins)."""
    return bool(_QUERY_OR_KEY.search(name))


def is_attention_pattern(name: str) -> bool:
    """True for ``hook_pattern``, the post-softmax attention ``[batch, head, query, key]``."""
    return bool(_ATTENTION_PATTERN.search(name))


def is_attention_scores(name: str) -> bool:
    """True for ``hook_attn_scores``, the pre-softmax attention ``[batch, head, query, key]``."""
    return name.endswith("hook_attn_scores")


def is_before_blocks(name: str) -> bool:
    """True for hooks before the first block: the token and position embeddings and rotary tables."""
    return name in ("hook_embed", "hook_pos_embed") or name.startswith(("embed.", "pos_embed.", "rotary_emb."))


def is_after_blocks(name: str) -> bool:
    """True for hooks after the last block: the final norm and the unembedding."""
    return name == "hook_unembed" or name.startswith(("ln_final.", "unembed."))


def layer_of(name: str) -> int | None:
    """The block index a hook belongs to (``blocks.L.…``), or ``None`` for embed/unembed hooks."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def blocks_needed(names: Sequence[str], n_layers: int) -> int | None:
    """How many blocks a pass must run for every hook in ``names`` to fire (``n_layers``: up to the final
    residual), or ``None`` when one sits on the final norm or the unembedding, so the whole model must run."""
    def needed(name: str) -> int | None:
        layer = layer_of(name)
        if layer is not None:
            return layer + 1
        if is_before_blocks(name):
            return 0
        return n_layers if name == final_norm_in() else None

    counts = [needed(name) for name in names]
    return None if None in counts else max(counts, default=0)  # type: ignore[type-var]


def first_layer(names: list[str] | tuple[str, ...]) -> int | None:
    """The first block any of ``names`` sits in; ``None`` if one sits before the blocks (embeddings)."""
    layers = [layer_of(name) for name in names]
    return None if not layers or any(layer is None for layer in layers) else min(layers)  # type: ignore[type-var]
