"""The torch candidate of ``bench_kmeans.py``: k-means for every head of a hook at once, greedy k-means++ then Lloyd.

Not used by the package: on CPU it lost to scikit-learn in both measured cases (docs/benchmarks.md);
it is kept here as the only candidate that runs on a GPU, to be measured where one is available.

The algorithm is scikit-learn's ``KMeans(algorithm="lloyd")``: greedy k-means++ with ``2 + log k``
candidate centres per step, Lloyd iterations until the centres move less than ``tol`` times the
data's mean feature variance, the best of ``n_init`` restarts by inertia, an empty cluster moved to
the point farthest from its centre. What differs is that every group (head) runs in the same
batched tensor operations, on the samples' device, so one call fits all heads of a hook. Random
draws come from a seeded CPU generator, so results are reproducible and do not depend on the device.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

#: Distances computed at once, as ``group x rows x clusters`` elements (64 MiB of float32).
CHUNK_ELEMENTS = 2**24


def kmeans(x: Float[Tensor, "group n feature"], n_clusters: int, seed: int, n_init: int = 3, max_iter: int = 300,
           tol: float = 1e-4) -> tuple[Float[Tensor, "group k feature"], Float[Tensor, " group"]]:
    """Cluster each group's samples; returns ``(centroids, inertia)``, the best of ``n_init`` restarts per group."""
    generator = torch.Generator().manual_seed(seed)
    x = x.float()
    sq = x.pow(2).sum(-1)  # [group, n]
    threshold = tol * x.var(dim=1, correction=0).mean(-1)  # [group]
    best_centroids, best_inertia = None, None
    for _ in range(n_init):
        centroids = _lloyd(x, sq, _plus_plus(x, sq, n_clusters, generator), threshold, max_iter)
        _, inertia = _assign(x, sq, centroids)
        if best_centroids is None or best_inertia is None:
            best_centroids, best_inertia = centroids, inertia
        else:
            better = inertia < best_inertia
            best_centroids = torch.where(better[:, None, None], centroids, best_centroids)
            best_inertia = torch.where(better, inertia, best_inertia)
    assert best_centroids is not None and best_inertia is not None
    return best_centroids, best_inertia


def assign(x: Float[Tensor, "group n feature"],
           centroids: Float[Tensor, "group k feature"]) -> tuple[Int[Tensor, "group n"], Float[Tensor, " group"]]:
    """Nearest centroid of every sample and the inertia (sum of squared distances) per group."""
    x = x.float()
    return _assign(x, x.pow(2).sum(-1), centroids.float())


def _distances(x: Tensor, sq: Tensor, centroids: Tensor) -> Tensor:
    """Squared distances ``[group, rows, k]`` from ``x [group, rows, feature]`` to ``centroids``."""
    products = torch.baddbmm(centroids.pow(2).sum(-1).unsqueeze(1), x, centroids.transpose(1, 2), alpha=-2)
    return products.add_(sq.unsqueeze(-1)).clamp_min_(0)


def _assign(x: Tensor, sq: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    groups, n, _ = x.shape
    rows = max(1, CHUNK_ELEMENTS // (groups * centroids.shape[1]))
    labels = torch.empty(groups, n, dtype=torch.long, device=x.device)
    nearest = torch.empty(groups, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        nearest[:, part], labels[:, part] = _distances(x[:, part], sq[:, part], centroids).min(-1)
    return labels, nearest.double().sum(-1)


def _plus_plus(x: Tensor, sq: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (scikit-learn's): each step keeps the best of ``2 + log k`` candidates."""
    groups, n, _ = x.shape
    every = torch.arange(groups, device=x.device)
    trials = 2 + int(math.log(k))
    centroids = x.new_empty(groups, k, x.shape[2])
    first = torch.randint(n, (groups,), generator=generator).to(x.device)
    centroids[:, 0] = x[every, first]
    closest = _distances(x, sq, centroids[:, :1]).squeeze(-1)  # [group, n]
    for c in range(1, k):
        cumulative = closest.double().cumsum(-1)
        draws = torch.rand(groups, trials, generator=generator, dtype=torch.float64).to(x.device)
        candidates = torch.searchsorted(cumulative, draws * cumulative[:, -1:]).clamp_max_(n - 1)  # [group, trials]
        picked = x[every.unsqueeze(1), candidates]  # [group, trials, feature]
        improved = torch.minimum(closest.unsqueeze(-1), _distances(x, sq, picked))  # [group, n, trials]
        best = improved.double().sum(1).argmin(-1)  # [group]
        closest = improved[every, :, best]
        centroids[:, c] = picked[every, best]
    return centroids


def _lloyd(x: Tensor, sq: Tensor, centroids: Tensor, threshold: Tensor, max_iter: int) -> Tensor:
    """Lloyd iterations; a group stops once its centres move less than its ``threshold`` (the others go on)."""
    centroids = centroids.clone()
    active = torch.arange(x.shape[0], device=x.device)
    for _ in range(max_iter):
        updated = _update(x[active], sq[active], centroids[active])
        moved = (updated - centroids[active]).pow(2).sum((1, 2))
        centroids[active] = updated
        active = active[moved > threshold[active]]
        if len(active) == 0:
            break
    return centroids


def _update(x: Tensor, sq: Tensor, centroids: Tensor) -> Tensor:
    """One Lloyd step: every centre moved to the mean of the samples nearest to it."""
    groups, _, feature = x.shape
    k = centroids.shape[1]
    labels, _ = _assign(x, sq, centroids)
    flat = (labels + k * torch.arange(groups, device=x.device).unsqueeze(1)).flatten()  # cluster across groups
    sums = x.new_zeros(groups * k, feature).index_add_(0, flat, x.reshape(-1, feature)).view(groups, k, feature)
    counts = torch.bincount(flat, minlength=groups * k).view(groups, k).to(x.dtype)
    updated = sums / counts.clamp_min(1).unsqueeze(-1)
    if bool((counts == 0).any()):
        updated = _relocate_empty(x, sq, updated, labels, counts)
    return updated


def _relocate_empty(x: Tensor, sq: Tensor, centroids: Tensor, labels: Tensor, counts: Tensor) -> Tensor:
    """Move each empty cluster onto one of the points farthest from their centres (as scikit-learn does)."""
    centroids = centroids.clone()
    for group in torch.nonzero((counts == 0).any(-1)).flatten().tolist():
        empty = torch.nonzero(counts[group] == 0).flatten()
        own = _distances(x[group:group + 1], sq[group:group + 1], centroids[group:group + 1])[0]
        far = own.gather(1, labels[group].unsqueeze(1)).squeeze(1).topk(len(empty)).indices
        centroids[group, empty] = x[group, far]
    return centroids
