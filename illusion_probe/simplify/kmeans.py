"""Vector quantisation: replace each activation by its nearest k-means centroid.

k-means needs the samples themselves, so fitting keeps a seeded, uniform
subsample of at most ``max_samples`` of them while batches stream past
(:class:`~illusion_probe.simplify.reservoir.Reservoir`), then fits with
scikit-learn (k-means++, ``n_init`` restarts, ``random_state=seed`` for
every head). The restarts only choose a starting point, so they run on a seeded
subsample of ``restart_samples`` rows (at least 8 per cluster); the best start is then refined by
Lloyd's iterations on every kept sample. Measured on the quick study's key and query
activations (docs/benchmarks.md): 3.3x faster than restarting on all 16k samples, at
+0.05% total inertia, inside the +/-3% a change of seed alone moves a single fit.
Past ``MINIBATCH_ABOVE`` samples it switches to ``MiniBatchKMeans``:
measured in docs/benchmarks.md, full k-means costs about the same up to 50k
samples and finds 4-9% lower inertia, while at 200k samples mini-batch is
2-16x faster. Applying is a nearest-centroid lookup in torch on the model's
device.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from illusion_probe.errors import require
from illusion_probe.registry import register_simplifier
from illusion_probe.simplify.reservoir import SampledSimplifier

#: Above this many (subsampled) samples, fit with ``MiniBatchKMeans`` (measured; see module docstring).
MINIBATCH_ABOVE = 100_000


@register_simplifier
class KMeans(SampledSimplifier):
    """Snap each activation to the nearest of ``n_clusters`` centroids.

    Args:
        n_clusters: number of centroids (at most the number of fitted samples).
        seed: seeds the subsample and scikit-learn's ``random_state``.
        n_init: k-means++ restarts; the best inertia wins.
        restart_samples: the restarts run on a seeded subsample of this many samples (at least 8 per
            cluster), and the best is refined on all of them; with fewer samples they run on all.
        max_samples: cap on samples kept for fitting (seeded uniform subsample beyond it).
        per_head: one centroid set per head of ``[batch, pos, head, d_head]``.
    """

    method: ClassVar[str] = "kmeans"
    size_option: ClassVar[str | None] = "n_clusters"

    def __init__(self, n_clusters: int, seed: int = 0, n_init: int = 3, max_samples: int = 200_000,
                 restart_samples: int = 1024, per_head: bool | None = None):
        super().__init__(per_head)
        for name, value in (("n_clusters", n_clusters), ("n_init", n_init), ("max_samples", max_samples),
                            ("restart_samples", restart_samples)):
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"KMeans: {name} must be a positive integer, got {value!r}")
        require(isinstance(seed, int), f"KMeans: seed must be an integer, got {seed!r}")
        self.n_clusters, self.seed, self.n_init, self.max_samples = n_clusters, seed, n_init, max_samples
        self.restart_samples = restart_samples

    def options(self) -> dict[str, Any]:
        return {**super().options(), "n_clusters": self.n_clusters, "seed": self.seed, "n_init": self.n_init,
                "max_samples": self.max_samples, "restart_samples": self.restart_samples}

    def random_baseline(self) -> SampledSimplifier | None:
        from illusion_probe.simplify.random_baselines import RandomCentroids  # it subclasses this class

        return RandomCentroids(self.n_clusters, seed=self.seed, max_samples=self.max_samples, per_head=self.per_head)

    # -- fitting ----------------------------------------------------------------------
    def check_sample_count(self, n: int) -> None:
        require(self.n_clusters <= min(n, self.max_samples), f"{self.describe()}: n_clusters={self.n_clusters} "
                f"exceeds the {min(n, self.max_samples)} samples it would be fitted on; use fewer clusters or more "
                "sequences")

    def fit_sample(self, samples: Tensor) -> None:
        require(self.n_clusters <= samples.shape[0],
                f"{self.describe()}: n_clusters={self.n_clusters} exceeds the {samples.shape[0]} fitted samples; "
                "use fewer clusters or more sequences")
        # every head uses random_state=seed, so fitting per head equals fitting each head alone
        self.centroids = torch.stack([self._fit_group(samples[:, g].numpy()) for g in range(samples.shape[1])])

    def _fit_group(self, data: np.ndarray) -> Tensor:
        from sklearn.cluster import KMeans as SkKMeans
        from sklearn.cluster import MiniBatchKMeans

        data = np.ascontiguousarray(data)
        with warnings.catch_warnings():  # fewer distinct points than clusters is allowed: duplicates stay exact
            warnings.filterwarnings("ignore", message=r"Number of distinct clusters \(\d+\) found smaller")
            if data.shape[0] > MINIBATCH_ABOVE:
                fitted = MiniBatchKMeans(self.n_clusters, init="k-means++", n_init=self.n_init,
                                         random_state=self.seed).fit(data)
            else:
                rows = self._restart_rows(data.shape[0])
                fitted = SkKMeans(self.n_clusters, init="k-means++", n_init=self.n_init,
                                  random_state=self.seed).fit(data if rows is None else data[rows])
                if rows is not None:  # the restarts chose a start; refine it on every sample
                    fitted = SkKMeans(self.n_clusters, init=fitted.cluster_centers_, n_init=1).fit(data)
        # Final M-step in float64: each centroid is its members' exact mean, so duplicates reconstruct exactly.
        labels = torch.from_numpy(fitted.labels_.astype(np.int64))
        members = torch.from_numpy(data).double()
        sums = torch.zeros(self.n_clusters, data.shape[1], dtype=torch.float64).index_add_(0, labels, members)
        counts = torch.bincount(labels, minlength=self.n_clusters).unsqueeze(1)
        centers = torch.from_numpy(np.asarray(fitted.cluster_centers_, dtype=np.float64))
        return torch.where(counts > 0, sums / counts.clamp_min(1), centers).to(torch.float32)

    def _restart_rows(self, n: int) -> np.ndarray | None:
        """Seeded, sorted row indices for the restarts (at least 8 per cluster), or None to restart on all ``n``."""
        size = max(self.restart_samples, 8 * self.n_clusters)
        return None if n <= size else np.sort(np.random.default_rng(self.seed).choice(n, size, replace=False))

    def tensors(self) -> dict[str, Tensor]:
        return {"centroids": self.centroids}

    def state_shapes(self, group: int, feature: int) -> dict[str, tuple[int, ...]]:
        return {"centroids": (group, self.n_clusters, feature)}

    def set_tensors(self, state: dict[str, Tensor]) -> None:
        self.centroids = state["centroids"]

    # -- application ------------------------------------------------------------------
    def derive(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        centroids = self.centroids.to(device=device, dtype=dtype)  # [group, k, feature]
        return {"centroids": centroids, "minus_2c_t": (-2 * centroids).transpose(1, 2).contiguous(),
                "sq_norms": centroids.pow(2).sum(-1)}

    def apply(self, x: Tensor) -> Tensor:
        d = self.derived(x)
        if x.shape[1] == 1:  # ||x - c||^2 up to the per-row constant ||x||^2
            nearest = torch.addmm(d["sq_norms"][0], x[:, 0], d["minus_2c_t"][0]).argmin(-1)
            return d["centroids"][0][nearest].unsqueeze(1)
        by_group = x.transpose(0, 1)
        nearest = torch.baddbmm(d["sq_norms"].unsqueeze(1), by_group, d["minus_2c_t"]).argmin(-1)  # [group, n]
        picked = torch.gather(d["centroids"], 1, nearest.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return picked.transpose(0, 1)
