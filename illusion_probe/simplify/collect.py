"""Stream hook activations of a split, batch by batch, keeping real positions only.

:func:`collect_activations` is a generator: each step runs one batch through
the model (no grad) with capture hooks and yields ``{hook name:
[n_tokens, *feature]}`` for that batch, so a consumer such as PCA never holds
every activation at once. Results are keyed by the name the *user* gave: on a
``TransformerBridge`` the ``hook.name`` a callback sees is the canonical one.
The forward stops after the last requested block (``stop_at_layer``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from operator import itemgetter
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from illusion_probe.errors import require
from illusion_probe.hook_names import is_attention_pattern, layer_of, resolve_hook_name
from illusion_probe.tasks.base import Split


def _stop_layer(model: torch.nn.Module, hook_names: Sequence[str]) -> int | None:
    """The first block no requested hook needs, or ``None`` when the whole model must run."""
    layers = [layer_of(name) for name in hook_names]
    if any(layer is None for layer in layers):
        return None
    stop = max(layers) + 1  # type: ignore[type-var]
    return stop if stop < model.cfg.n_layers else None


def collect_activations(
    model: torch.nn.Module,
    split: Split,
    hook_names: Sequence[str],
    n_sequences: int | None = None,
    batch_size: int = 64,
    positions: Bool[Tensor, "n pos"] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Yield, per batch of sequences, ``{hook name: [n_tokens, *feature]}`` at the selected positions.

    Args:
        model: a HookedTransformer or TransformerBridge.
        split: sequences to run; only real (non-pad) positions are kept.
        hook_names: hooks to capture (legacy or canonical names); keys of the yielded dicts.
            Attention patterns are not token-indexed and are refused.
        n_sequences: use only the first ``n_sequences`` sequences (all when ``None``).
        batch_size: sequences per forward pass.
        positions: optional ``[n, pos]`` mask over the split, further restricting the positions kept.

    Yields:
        One dict per batch; a batch with no selected position is skipped.
    """
    names = list(dict.fromkeys(hook_names))
    require(len(names) > 0, "collect_activations: give at least one hook name")
    for name in names:
        resolve_hook_name(model, name)
        require(not is_attention_pattern(name),
                f"collect_activations: {name!r} is an attention pattern [batch, head, query, key], not token-indexed")
    require(positions is None or tuple(positions.shape) == tuple(split.tokens.shape),
            f"collect_activations: positions mask has shape {tuple(positions.shape) if positions is not None else ()}"
            f", split tokens {tuple(split.tokens.shape)}")
    keep = split.real_mask if positions is None else split.real_mask & positions.to(split.real_mask.device).bool()
    n = len(split) if n_sequences is None else min(n_sequences, len(split))
    require(n > 0, f"collect_activations: split {split.name!r} has no sequences to run")
    stop = _stop_layer(model, names)
    device = model.cfg.device
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        width = int(keep[rows].sum(0).nonzero().max()) + 1 if bool(keep[rows].any()) else 0
        if width == 0:
            continue
        mask = keep[rows, :width].to(device)
        captured: dict[str, Tensor] = {}
        with torch.no_grad():
            model.run_with_hooks(split.tokens[rows, :width].to(device),
                                 fwd_hooks=[(name, _recorder(captured, name, itemgetter(mask))) for name in names],
                                 **({} if stop is None else {"stop_at_layer": stop}))
        yield captured


def _recorder(store: dict[str, Any], name: str, transform: Any) -> Any:
    """A capture hook storing ``transform(activation)`` under the user's ``name`` (not ``hook.name``)."""
    def hook_fn(act: Tensor, hook: Any) -> None:
        store[name] = transform(act.detach())
    return hook_fn


def probe_feature_shapes(model: torch.nn.Module, hook_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per hook, the shape an activation has beyond ``[batch, pos]`` on a tiny input.

    For attention patterns ``[batch, head, query, key]`` only ``(head,)`` is position-free and reported.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    names = list(dict.fromkeys(hook_names))
    if not names:
        return shapes
    tokens = (torch.arange(2) % model.cfg.d_vocab).unsqueeze(0).to(model.cfg.device)
    hooks = [(name, _recorder(shapes, name, (lambda a: (a.shape[1],)) if is_attention_pattern(name)
                              else (lambda a: tuple(a.shape[2:])))) for name in names]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks,
                             **({} if (stop := _stop_layer(model, names)) is None else {"stop_at_layer": stop}))
    return shapes
