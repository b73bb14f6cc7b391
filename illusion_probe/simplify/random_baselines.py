"""Random baselines: a simplifier's form with its learned structure replaced by chance.

A gap is read against what no structure gives. :class:`RandomSubspace` keeps PCA's (or SVD's)
form, ``x_hat = mu + (x - mu) Q Q^T``, with the fitted mean ``mu`` but a seeded random orthonormal
basis ``Q`` of the same rank in place of the principal directions. :class:`RandomCentroids` keeps
k-means' nearest-centroid form with ``n_clusters`` samples drawn at random from the fit sample as
centroids, in place of the cluster means. Both are fitted like the simplifier they stand for, on
the same data, and ``PCA.random_baseline()`` / ``KMeans.random_baseline()`` return them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from illusion_probe.errors import require
from illusion_probe.registry import register_simplifier
from illusion_probe.simplify.base import FittedSimplifier
from illusion_probe.simplify.kmeans import KMeans
from illusion_probe.simplify.pca import PCA


@register_simplifier
class RandomSubspace(PCA):
    """Project onto a seeded random ``rank``-dimensional subspace through the fitted mean (``center=False``: through 0).

    Args:
        rank: dimension of the subspace kept.
        seed: seeds the basis (drawn for every group at once).
        center: keep the fitted mean (PCA's form) or not (SVD's).
        per_head: one basis per head of ``[batch, pos, head, d_head]``.
    """

    method: ClassVar[str] = "random_subspace"

    def __init__(self, rank: int, seed: int = 0, center: bool = True, per_head: bool | None = None):
        super().__init__(rank, center=center, per_head=per_head)
        require(isinstance(seed, int) and not isinstance(seed, bool), f"RandomSubspace: seed must be an integer, got {seed!r}")
        self.seed = seed

    def options(self) -> dict[str, Any]:
        return {**super().options(), "seed": self.seed}

    def sharing_key(self) -> None:
        return None  # the moments are cheap here, and a sweep of random subspaces is not what they are for

    def finish(self) -> None:
        mean, self.eigenvalues, _ = self._moments.spectrum(self.center)
        del self._moments
        groups, feature = mean.shape
        generator = torch.Generator().manual_seed(self.seed)
        gaussian = torch.randn(groups, feature, self.rank, generator=generator, dtype=torch.float64)
        self.components = torch.linalg.qr(gaussian).Q.to(torch.float32)
        self.mean = mean.to(torch.float32)

    def _fitted_config(self) -> dict[str, Any]:
        return FittedSimplifier._fitted_config(self)  # no explained variance ratio: the directions are not PCA's

    def random_baseline(self) -> None:
        return None


@register_simplifier
class RandomCentroids(KMeans):
    """Snap each activation to the nearest of ``n_clusters`` samples drawn at random from the fit sample.

    Args:
        n_clusters: number of centroids (at most the number of fitted samples).
        seed: seeds the subsample and the draw of centroids.
        max_samples: cap on samples kept (seeded uniform subsample beyond it).
        per_head: one centroid set per head of ``[batch, pos, head, d_head]``.
    """

    method: ClassVar[str] = "random_centroids"

    def __init__(self, n_clusters: int, seed: int = 0, max_samples: int = 200_000, per_head: bool | None = None):
        super().__init__(n_clusters, seed=seed, n_init=1, max_samples=max_samples, per_head=per_head)

    def options(self) -> dict[str, Any]:
        options = super().options()
        del options["n_init"], options["restart_samples"]
        return options

    def fit_sample(self, samples: Tensor) -> None:
        require(self.n_clusters <= samples.shape[0], f"{self.describe()}: n_clusters={self.n_clusters} exceeds the "
                f"{samples.shape[0]} fitted samples; use fewer clusters or more sequences")
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.stack([torch.randperm(samples.shape[0], generator=generator)[: self.n_clusters]
                              for _ in range(samples.shape[1])])  # [group, n_clusters]
        self.centroids = torch.stack([samples[chosen[g], g] for g in range(samples.shape[1])]).contiguous()

    def random_baseline(self) -> None:
        return None
