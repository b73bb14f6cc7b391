"""Sweeps: one proxy per size (rank, cluster count, ...) of one simplifier family, all evaluated together."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from illusion_probe.errors import require
from illusion_probe.evaluation import evaluate
from illusion_probe.results import Results
from illusion_probe.simplify.base import Simplifier
from illusion_probe.simplify.fitting import fit_proxies
from illusion_probe.simplify.proxy import Proxy
from illusion_probe.tasks.base import Split, SplitSet, Task, as_split_set


def hooks_label(hooks: Sequence[str]) -> str:
    """Compact label for a hook set: ``blocks.1.attn.hook_k+hook_q`` for a shared prefix."""
    hooks = list(hooks)
    if len(hooks) == 1:
        return hooks[0]
    prefix = os.path.commonprefix(hooks)
    prefix = prefix[: prefix.rfind(".") + 1]
    return prefix + "+".join(h[len(prefix):] for h in hooks)


def proxy_name(method: str, size: int | None, hooks: Sequence[str]) -> str:
    """Name of a proxy in results: ``pca(4)@blocks.1.attn.hook_k+hook_q``."""
    return f"{method}{'' if size is None else f'({size})'}@{hooks_label(hooks)}"


def sweep_proxies(
    model: torch.nn.Module,
    fit_split: Split,
    hooks: Sequence[str],
    method: str,
    sizes: Sequence[int | None] = (None,),
    n_sequences: int = 1000,
    **options: Any,
) -> dict[str, Proxy]:
    """Fit one proxy per size, each simplifying every hook in ``hooks`` with the registered family ``method``,
    all from one streamed pass (every PCA rank from one eigendecomposition; see :func:`fit_proxies`).

    Args:
        model: the hooked model.
        fit_split: the split the simplifiers are fit on (role ``train``).
        hooks: hook names (legacy or canonical).
        method: a registered simplifier (``pca``, ``svd``, ``kmeans``, ``onehot_attention``, a user's own, ...).
        sizes: values of the family's size option (ranks, cluster counts); ``(None,)`` for size-free families.
        n_sequences: sequences of ``fit_split`` to fit on.
        options: further constructor options for the simplifier (e.g. ``seed`` for k-means).
    """
    return fit_proxies(model, sweep_simplifiers(hooks, method, sizes, **options), fit_split, n_sequences)


def sweep_simplifiers(hooks: Sequence[str], method: str, sizes: Sequence[int | None] = (None,),
                      **options: Any) -> dict[str, dict[str, Simplifier]]:
    """Unfitted simplifiers of a sweep: proxy name -> {hook: simplifier}, one proxy per size."""
    require(len(hooks) > 0, "a sweep needs at least one hook name")
    require(len(sizes) > 0, "a sweep needs at least one size")
    return {proxy_name(method, size, hooks): {hook: Simplifier.create(method, size, **options) for hook in hooks}
            for size in sizes}


def sweep(
    model: torch.nn.Module,
    splits: SplitSet | Mapping[str, Split],
    task: Task | None = None,
    hooks: Sequence[str] = (),
    method: str = "pca",
    sizes: Sequence[int] = (1, 2, 4, 8, 16),
    fit_split: str = "train",
    n_sequences: int = 1000,
    **evaluate_options: Any,
) -> Results:
    """Fit ``method`` at every size on ``splits[fit_split]`` and evaluate all proxies on every split.

    Returns:
        :class:`Results` whose records carry ``method`` and ``size``, ready for
        :meth:`Results.headline` and the report's sweep figure.
    """
    splits = as_split_set(splits, "sweep")
    proxies = sweep_proxies(model, splits[fit_split], hooks, method, sizes, n_sequences)
    return evaluate(model, proxies, splits, task, **evaluate_options)
