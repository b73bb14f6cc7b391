"""Fitting proxies: every hook of every proxy from one streamed pass over the fit split.

:func:`fit_proxies` checks everything before the first forward pass (the split's role, hook names,
each simplifier against its hook's shape and the fit tokens, whether edits take effect), then runs
the fit sequences through the model once, capturing every hook any proxy needs. Simplifiers at one
hook whose :meth:`~illusion_probe.simplify.base.FittedSimplifier.sharing_key` agree accumulate once:
all ranks of a PCA sweep come from one Gram matrix and one eigendecomposition, all cluster counts of
a k-means sweep from one reservoir sample. Every proxy equals the one fitted alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from tqdm.auto import tqdm

from illusion_probe.backends import Backend
from illusion_probe.distributed import World, all_gather, world
from illusion_probe.errors import require
from illusion_probe.hook_names import is_per_head, resolve_hook_name
from illusion_probe.simplify.base import FittedSimplifier, Simplifier
from illusion_probe.simplify.collect import collect_activations
from illusion_probe.simplify.proxy import Proxy, check_hooks, default_name
from illusion_probe.tasks.base import Split, check_split


def fit_proxy(
    model: torch.nn.Module,
    simplifiers: Mapping[str, Simplifier],
    split: Split,
    n_sequences: int = 1000,
    batch_size: int = 64,
    allow_non_train: bool = False,
    name: str | None = None,
) -> Proxy:
    """Fit unfitted *copies* of ``simplifiers`` on ``split`` in one streamed pass; the arguments are not modified.

    Everything is checked before the first forward pass: the split's role, the hook names, each
    simplifier against its hook's shape, and whether edits at attention patterns take effect.

    Args:
        model: a HookedTransformer or TransformerBridge.
        simplifiers: ``{hook name: simplifier}``; legacy and canonical names both work and
            the proxy is keyed by the names given. ``per_head`` defaults to the hook kind.
        split: the training split (``role == "train"``).
        n_sequences: fit on the first ``n_sequences`` sequences (real positions only).
        batch_size: sequences per forward pass.
        allow_non_train: permit fitting on a split whose role is not ``"train"``.
        name: the proxy's label (see :class:`Proxy`).
    """
    require(isinstance(simplifiers, Mapping) and len(simplifiers) > 0,
            "fit_proxy: give at least one {hook name: simplifier}")
    _check_simplifiers(simplifiers)
    label = name or default_name(simplifiers)
    return fit_proxies_with(Backend.of(model), {label: simplifiers}, split, n_sequences, batch_size,
                            allow_non_train)[label]


def fit_proxies(
    model: torch.nn.Module,
    wanted: Mapping[str, Mapping[str, Simplifier]],
    split: Split,
    n_sequences: int = 1000,
    batch_size: int = 64,
    allow_non_train: bool = False,
    progress: bool = False,
) -> dict[str, Proxy]:
    """Fit every proxy of ``wanted`` (``{proxy name: {hook name: simplifier}}``) in one streamed pass.

    The arguments are as for :func:`fit_proxy`; ``progress`` shows a bar over the proxies. Returns
    ``{proxy name: Proxy}`` in the order of ``wanted``, each equal to :func:`fit_proxy` on its own.
    Under ``torchrun`` each process streams its share of the sequences and every process returns every
    proxy (:mod:`illusion_probe.distributed`).
    """
    return fit_proxies_with(Backend.of(model), wanted, split, n_sequences, batch_size, allow_non_train, progress)


def fit_proxies_with(backend: Backend, wanted: Mapping[str, Mapping[str, Simplifier]], split: Split,
                     n_sequences: int = 1000, batch_size: int = 64, allow_non_train: bool = False,
                     progress: bool = False) -> dict[str, Proxy]:
    """:func:`fit_proxies` given the model's backend adapter."""
    check_split(split, "fit_proxy")
    require(split.role == "train" or allow_non_train,
            f"fit_proxy: split {split.name!r} has role {split.role!r}; fitting off the training distribution "
            "would hide the very gap we measure (pass allow_non_train=True to do it anyway)")
    require(isinstance(n_sequences, int) and n_sequences > 0, f"fit_proxy: n_sequences must be positive, got {n_sequences!r}")
    require(isinstance(batch_size, int) and batch_size > 0, f"fit_proxy: batch_size must be positive, got {batch_size!r}")
    require(isinstance(wanted, Mapping) and len(wanted) > 0, "fit_proxies: give at least one "
            "{proxy name: {hook name: simplifier}}")
    fitted, shapes = {}, {}
    for name, simplifiers in wanted.items():
        require(isinstance(simplifiers, Mapping) and len(simplifiers) > 0,
                f"fit_proxies: proxy {name!r} needs at least one {{hook name: simplifier}}")
        _check_simplifiers(simplifiers)
        fitted[name] = {hook: _fit_copy(hook, s) for hook, s in simplifiers.items()}
        shapes[name] = check_hooks(backend, fitted[name])
    n = min(n_sequences, len(split))
    n_tokens = int(split.real_mask[:n].sum())
    jobs = [(hook, s) for simplifiers in fitted.values() for hook, s in simplifiers.items() if s.needs_data]
    require(n_tokens > 0 or not jobs,
            f"fit_proxy: the first {n} sequences of split {split.name!r} hold no real token to fit on")
    for _, simplifier in jobs:
        simplifier.check_sample_count(n_tokens)
    here = world()
    shards = [split.real_mask[World(rank, here.size).block(n)].sum() for rank in range(here.size)]
    require(not jobs or all(shards), f"fit_proxy: {here.size} processes share the first {n} sequences of split "
            f"{split.name!r}, and some process would get no real token; fit on more sequences or run fewer processes")
    with tqdm(total=len(fitted), desc="fit", unit="proxy", disable=not (progress and here.is_main)) as bar:
        if jobs:
            bar.set_postfix_str(f"collecting {n} sequences", refresh=True)
            _accumulate(backend, jobs, split, here.block(n), batch_size)
        _finish([s for simplifiers in fitted.values() for s in simplifiers.values() if s.needs_data], here)
        bar.update(len(fitted))
    fit_info = {"split": split.name, "role": split.role, "n_sequences": n, "n_tokens": n_tokens}
    return {name: Proxy(simplifiers, name=name, feature_shapes=shapes[name], fit_info=fit_info, backend=backend.kind)
            for name, simplifiers in fitted.items()}


def _accumulate(backend: Backend, jobs: list[tuple[str, Simplifier]], split: Split, shard: slice,
                batch_size: int) -> None:
    """Stream this process's ``shard`` of ``split``'s sequences once into ``jobs``, then combine the shards of
    every process: one simplifier per sharing group accumulates, the others share its state."""
    leaders: dict[Hashable, tuple[str, Simplifier]] = {}
    followers: list[tuple[FittedSimplifier, Hashable]] = []
    for hook, simplifier in jobs:
        key = simplifier.sharing_key() if isinstance(simplifier, FittedSimplifier) else None
        if key is None:
            leaders[id(simplifier)] = (hook, simplifier)
            continue
        group = (resolve_hook_name(backend.model, hook), type(simplifier), simplifier.per_head, key)
        if group in leaders:
            followers.append((simplifier, group))
        else:
            leaders[group] = (hook, simplifier)
    readers = [(hook, simplifier, simplifier.input_hook(hook)) for hook, simplifier in leaders.values()]
    hooks = list(dict.fromkeys(name for hook, _, source in readers for name in (hook, source) if name is not None))
    offset = int(split.real_mask[: shard.start].sum())
    for _, simplifier, _ in readers:
        simplifier.stream_from(offset)
    for batch in collect_activations(backend.model, split.select(shard), hooks, batch_size=batch_size):
        for hook, simplifier, source in readers:
            acts = batch[hook] if simplifier.per_head else batch[hook].flatten(1)
            if source is None:
                simplifier.partial_fit(acts)
            else:  # a transcoder: (MLP input, MLP output) pairs at the same positions
                simplifier.partial_fit(acts, inputs=batch[source].flatten(1))  # type: ignore[call-arg]
    if world().is_distributed:
        for _, simplifier, _ in readers:
            simplifier.combine_shards()
    for follower, group in followers:
        follower.share_accumulated(leaders[group][1])


def _finish(simplifiers: list[FittedSimplifier], here: World) -> None:
    """Finalize every simplifier: those that finish together on every process (data-parallel); of the others,
    each process finishes every ``here.size``-th one and sends its state to the others."""
    for simplifier in simplifiers:
        if simplifier.finishes_together:
            simplifier.finalize()
    alone = [index for index, simplifier in enumerate(simplifiers) if not simplifier.finishes_together]
    mine = alone[here.rank::here.size]
    for index in mine:
        simplifiers[index].finalize()
    if not here.is_distributed:
        return
    states = {f"{index}/{name}": tensor for index in mine for name, tensor in simplifiers[index].state_dict().items()}
    configs = {index: simplifiers[index].config() for index in mine}
    for tensors, sent in all_gather(states, configs):
        for key, config in sent.items():
            index = int(key)
            if index not in mine:
                prefix = f"{index}/"
                simplifiers[index].receive_fitted(config, {name.removeprefix(prefix): t for name, t in tensors.items()
                                                           if name.startswith(prefix)})


def _check_simplifiers(simplifiers: Mapping[str, Simplifier]) -> None:
    for hook, simplifier in simplifiers.items():
        require(isinstance(simplifier, Simplifier),
                f"fit_proxy: the value for {hook!r} is a {type(simplifier).__name__}, not an ip.Simplifier")


def _fit_copy(hook: str, simplifier: Simplifier) -> Simplifier:
    """An unfitted copy; ``per_head`` follows the hook name unless the caller chose it."""
    if not isinstance(simplifier, FittedSimplifier):
        return simplifier.unfitted()
    per_head = simplifier.per_head if simplifier.per_head_given else is_per_head(hook)
    require(not per_head or is_per_head(hook),
            f"{simplifier.describe()}: per_head=True needs a per-head hook (hook_q/k/v/z), not {hook!r}")
    return simplifier.unfitted(per_head=per_head)
