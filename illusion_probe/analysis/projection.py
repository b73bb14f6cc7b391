"""Keys and queries of one head on their top two principal components, for the report.

The components are fit on the ``train`` split only, so OOD points are shown in
the coordinates an in-distribution analysis would use, which is exactly where an
illusion shows: OOD keys and queries can leave the region the explanation covers.
The result is a plain-data artefact (:class:`Projection`) saved as JSON beside the
results, so a report can be rebuilt from files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from illusion_probe.artifacts import read_json, write_json
from illusion_probe.backends import Backend
from illusion_probe.errors import ArtifactError, require
from illusion_probe.hook_names import attn_k, attn_q
from illusion_probe.provenance import provenance
from illusion_probe.tasks.base import Split

KINDS = {"query": attn_q, "key": attn_k}
KIND = "projection"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Panel:
    """One split's keys or queries: coordinates on the two components, and each point's depth label (if any)."""

    split: str
    kind: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    depth: tuple[int, ...]


@dataclass(frozen=True)
class Projection:
    """Keys and queries of one head on the ``train`` split's top two principal components.

    Attributes:
        layer, head: the analysed head.
        panels: one per split and kind (``query``, ``key``).
        meta: how it was made (points per panel, seed, versions and thread count, fingerprint of the run).
    """

    layer: int
    head: int
    panels: tuple[Panel, ...]
    meta: Mapping[str, Any]

    @property
    def title(self) -> str:
        return f"layer {self.layer} head {self.head}: keys and queries on the train split's top two principal components"

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the artefact atomically; returns the path."""
        write_json(path, {"kind": KIND, "format_version": FORMAT_VERSION, "layer": self.layer, "head": self.head,
                          "panels": [asdict(p) for p in self.panels], "meta": dict(self.meta)})
        return Path(path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Projection:
        """Read an artefact written by :meth:`to_json`; anything else is a one-line ``ArtifactError``."""
        data = read_json(path)
        if data.get("kind") != KIND or data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{path}: not an illusion-probe projection (format {FORMAT_VERSION}); delete it and "
                                "rerun the study to rebuild it")
        try:
            panels = tuple(Panel(split=str(p["split"]), kind=str(p["kind"]), x=tuple(map(float, p["x"])),
                                 y=tuple(map(float, p["y"])), depth=tuple(map(int, p["depth"])))
                           for p in data["panels"])
            return cls(int(data["layer"]), int(data["head"]), panels, dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path}: malformed projection ({err}); delete it and rerun the study") from None


def _head_vectors(backend: Backend, split: Split, layer: int, head: int, batch_size: int = 256) -> dict[str, Tensor]:
    """``{kind: [n_tokens, d_head]}`` at real positions, plus ``depth`` ``[n_tokens]`` when the split has it."""
    parts: dict[str, list[Tensor]] = {kind: [] for kind in [*KINDS, "depth"]}
    seen: dict[str, Tensor] = {}

    def keep(kind: str) -> Any:
        def hook(act: Tensor, hook: Any) -> None:
            seen[kind] = act[..., head, :].detach()
        return hook

    hooks = [(name(layer), keep(kind)) for kind, name in KINDS.items()]
    stop = layer + 1 if layer + 1 < backend.n_layers else None
    for batch in split.batches(batch_size):
        batch = batch.to(backend.device)
        with torch.no_grad():
            backend.run(batch.tokens, batch.real_mask, hooks, stop_at_layer=stop)
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
) -> Projection:
    """Keys and queries of ``(layer, head)`` on the train split's top two principal components.

    Args:
        model: hooked model.
        splits: must include ``train``; every split contributes one panel per kind.
        layer, head: the analysed head.
        n_points: points sampled (seeded) per split and kind.
        seed: sampling seed.
    """
    require("train" in splits, "the projection is fit on the 'train' split, which is missing")
    backend = Backend.of(model)
    vectors = {name: _head_vectors(backend, split, layer, head) for name, split in splits.items()}
    bases = {kind: _top2(vectors["train"][kind]) for kind in KINDS}
    generator = torch.Generator().manual_seed(seed)
    panels = []
    for name, found in vectors.items():
        n = found["query"].shape[0]
        pick = torch.randperm(n, generator=generator)[: min(n_points, n)]
        for kind in KINDS:
            mean, basis = bases[kind]
            xy = ((found[kind][pick].double() - mean) @ basis).float()
            depth = tuple(found["depth"][pick].tolist()) if found["depth"].numel() else ()
            panels.append(Panel(name, kind, tuple(round(v, 4) for v in xy[:, 0].tolist()),
                                tuple(round(v, 4) for v in xy[:, 1].tolist()), depth))
    return Projection(layer, head, tuple(panels), {"n_points": n_points, "seed": seed, **provenance()})
