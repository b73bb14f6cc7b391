"""Keys and queries of one head on their top two principal components, for the report.

The components are fit on the ``train`` split only, so OOD points are shown in
the coordinates an in-distribution analysis would use, which is exactly where an
illusion shows: OOD keys and queries can leave the region the explanation covers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from illusion_probe.errors import require
from illusion_probe.tasks.base import Split

KINDS = {"query": "hook_q", "key": "hook_k"}


def _head_vectors(model: torch.nn.Module, split: Split, layer: int, head: int, batch_size: int = 256) -> dict[str, Tensor]:
    """``{kind: [n_tokens, d_head]}`` at real positions, plus ``depth`` ``[n_tokens]`` when the split has it."""
    parts: dict[str, list[Tensor]] = {kind: [] for kind in KINDS}
    parts["depth"] = []
    device = next(model.parameters()).device
    seen: dict[str, Tensor] = {}

    def keep(kind: str):
        def hook(act: Tensor, hook) -> None:  # noqa: ARG001 - TransformerLens passes hook=
            seen[kind] = act[..., head, :].detach()
        return hook

    hooks = [(f"blocks.{layer}.attn.{name}", keep(kind)) for kind, name in KINDS.items()]
    for batch in split.batches(batch_size):
        batch = batch.to(device)
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(batch.tokens, stop_at_layer=layer + 1)
        for kind in KINDS:
            parts[kind].append(seen[kind][batch.real_mask].float().cpu())
        depth = batch.labels.get("depth")
        parts["depth"].append((depth[batch.real_mask] if depth is not None else torch.zeros(0)).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _top2(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = x.double().mean(0)
    _, _, v = torch.linalg.svd(x.double() - mean, full_matrices=False)
    return mean, v[:2].T


def key_query_projection(
    model: torch.nn.Module, splits: Mapping[str, Split], layer: int, head: int, n_points: int = 600, seed: int = 0
) -> dict[str, Any]:
    """Plain-data panels for :func:`illusion_probe.report.figures.projection_figure`.

    Args:
        model: hooked model.
        splits: must include ``train``; every split contributes one panel per kind.
        layer, head: the analysed head.
        n_points: points sampled (seeded) per split and kind.
        seed: sampling seed.
    """
    require("train" in splits, "the projection is fit on the 'train' split, which is missing")
    vectors = {name: _head_vectors(model, split, layer, head) for name, split in splits.items()}
    bases = {kind: _top2(vectors["train"][kind]) for kind in KINDS}
    generator = torch.Generator().manual_seed(seed)
    panels = []
    for name, found in vectors.items():
        n = found["query"].shape[0]
        pick = torch.randperm(n, generator=generator)[: min(n_points, n)]
        for kind in KINDS:
            mean, basis = bases[kind]
            xy = ((found[kind][pick].double() - mean) @ basis).float()
            depth = found["depth"][pick].tolist() if found["depth"].numel() else []
            panels.append({"split": name, "kind": kind, "x": [round(v, 4) for v in xy[:, 0].tolist()],
                           "y": [round(v, 4) for v in xy[:, 1].tolist()], "depth": depth})
    return {"title": f"layer {layer} head {head}: keys and queries on the train split's top two principal components",
            "panels": panels}
