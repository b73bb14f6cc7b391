"""Stream hook activations of a split, batch by batch, keeping real positions only.

:func:`collect_activations` is a generator: each step runs one batch through
the model (no grad) with capture hooks and yields ``{hook name:
[n_tokens, *feature]}`` for that batch, so a consumer such as PCA never holds
every activation at once. Results are keyed by the name the *user* gave: on a
``TransformerBridge`` the ``hook.name`` a callback sees is the canonical one.
Each pass runs no further than the hooks need (:meth:`Backend.run`): hooks in the blocks never
make it compute the unembedding's full-vocabulary logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from illusion_probe.backends import Backend
from illusion_probe.errors import require
from illusion_probe.hook_names import is_attention_pattern, resolve_hook_name
from illusion_probe.tasks.base import Split, check_split, check_tokens


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
    check_split(split, "collect_activations")
    backend = Backend.of(model)
    names = list(dict.fromkeys(hook_names))
    require(len(names) > 0, "collect_activations: give at least one hook name")
    for name in names:
        resolve_hook_name(model, name)
        require(not is_attention_pattern(name),
                f"collect_activations: {name!r} is an attention pattern [batch, head, query, key], not token-indexed")
    require(positions is None or tuple(positions.shape) == tuple(split.tokens.shape),
            f"collect_activations: positions mask has shape {tuple(positions.shape) if positions is not None else ()}"
            f", split tokens {tuple(split.tokens.shape)}")
    require(isinstance(batch_size, int) and batch_size > 0,
            f"collect_activations: batch_size must be a positive integer, got {batch_size!r}")
    check_tokens(split.tokens, backend.d_vocab, backend.n_ctx, f"split {split.name!r}")
    keep = split.real_mask if positions is None else split.real_mask & positions.to(split.real_mask.device).bool()
    n = len(split) if n_sequences is None else min(n_sequences, len(split))
    require(n > 0, f"collect_activations: split {split.name!r} has no sequences to run")
    yield from _batches(backend, split, names, keep, n, batch_size)


def _batches(backend: Backend, split: Split, names: list[str], keep: Tensor, n: int,
             batch_size: int) -> Iterator[dict[str, Tensor]]:
    device = backend.device
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        if not bool(keep[rows].any()):
            continue
        width = int(split.real_mask[rows].sum(1).max())
        mask = keep[rows, :width].to(device)
        captured: dict[str, Tensor] = {}
        with torch.no_grad():
            backend.run(split.tokens[rows, :width].to(device), split.real_mask[rows, :width].to(device),
                        [(name, _recorder(captured, name, mask)) for name in names])
        yield captured


def _recorder(store: dict[str, Any], name: str, mask: Tensor) -> Any:
    """A capture hook storing the activation at ``mask`` under the user's ``name`` (not ``hook.name``)."""
    def hook_fn(act: Tensor, hook: Any) -> None:
        store[name] = act.detach()[mask]
    return hook_fn
