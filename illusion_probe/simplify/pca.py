"""Low-rank projection: PCA (centred) and SVD (uncentred).

Fitting streams batches into a float64 mean and Gram matrix on the
activations' device (memory independent of the number of tokens), then runs a
single symmetric eigendecomposition. Applying computes
``x_hat = mu + (x - mu) V V^T`` (``mu = 0`` for SVD) in the activation's dtype,
with either the precomputed projector ``V V^T`` or two thin matmuls, whichever
is cheaper for the rank.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusion_probe.errors import IllusionProbeWarning, require
from illusion_probe.registry import register_simplifier
from illusion_probe.simplify.base import FittedSimplifier


@register_simplifier
class PCA(FittedSimplifier):
    """Project onto the top-``rank`` principal directions of the fitted activations.

    Args:
        rank: number of directions kept (``1 <= rank <= feature dim``).
        center: subtract the mean before projecting (``False`` is :class:`SVD`).
        per_head: fit each head of ``[batch, pos, head, d_head]`` separately.
    """

    method: ClassVar[str] = "pca"
    size_option: ClassVar[str | None] = "rank"

    def __init__(self, rank: int, center: bool = True, per_head: bool | None = None):
        super().__init__(per_head)
        require(isinstance(rank, int) and not isinstance(rank, bool) and rank > 0,
                f"{type(self).__name__}: rank must be a positive integer, got {rank!r}")
        self.rank = rank
        self.center = bool(center)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "rank": self.rank, "center": self.center}

    # -- fitting ----------------------------------------------------------------------
    def check_feature_dim(self, feature: int) -> None:
        require(self.rank <= feature, f"{self.describe()}: rank {self.rank} exceeds the feature dimension {feature}")

    def start(self, shape: tuple[int, int], device: torch.device) -> None:
        groups, feature = shape
        self._sum = torch.zeros(groups, feature, dtype=torch.float64, device=device)
        self._gram = torch.zeros(groups, feature, feature, dtype=torch.float64, device=device)

    def accumulate(self, x: Tensor) -> None:
        x64 = x.to(torch.float64)
        self._sum += x64.sum(dim=0)
        if x.shape[1] == 1:
            self._gram[0].addmm_(x64[:, 0].T, x64[:, 0])
        else:
            by_group = x64.transpose(0, 1)
            self._gram.baddbmm_(by_group.transpose(1, 2), by_group)

    def finish(self) -> None:
        n = self._n_seen
        mean = self._sum / n
        second = self._gram / n
        if self.center:
            second = second - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        values, vectors = torch.linalg.eigh(second)  # ascending
        self.eigenvalues = values.flip(-1).clamp_min(0.0)
        self.components = vectors.flip(-1)[..., : self.rank].to(torch.float32).contiguous()
        self.mean = (mean if self.center else torch.zeros_like(mean)).to(torch.float32)
        del self._sum, self._gram
        self._warn_beyond_numerical_rank()

    def _warn_beyond_numerical_rank(self) -> None:
        """Warn when ``rank`` exceeds the fitted data's numerical rank: the extra directions are arbitrary.

        Numerical rank as ``numpy.linalg.matrix_rank`` counts it, for float32 activations: singular values
        above ``largest * feature * eps(float32)``.
        """
        singular = self.eigenvalues.sqrt()
        tolerance = singular[..., :1] * singular.shape[-1] * torch.finfo(torch.float32).eps
        numerical = int((singular > tolerance).sum(-1).min())
        if self.rank > numerical:
            warnings.warn(f"{self.describe()}: the fitted activations have numerical rank {numerical}, so "
                          f"{self.rank - numerical} of the kept directions are arbitrary; use rank <= {numerical} "
                          "or fit on more varied data", IllusionProbeWarning, stacklevel=4)

    def _fitted_config(self) -> dict[str, Any]:
        """The fitted shape and sample count, plus the explained variance ratio of each kept component, per group."""
        if not self.is_fitted:
            return super()._fitted_config()
        ratio = self.explained_variance_ratio[..., : self.rank]
        return {**super()._fitted_config(), "explained_variance_ratio": [[round(float(v), 6) for v in group]
                                                                         for group in ratio]}

    @property
    def explained_variance_ratio(self) -> Float[Tensor, "group feature"]:
        """Share of the (centred, for PCA) second moment along each direction, descending; ``[group, feature]``."""
        require(self.is_fitted, f"{self.describe()}: not fitted")
        return self.eigenvalues / self.eigenvalues.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)

    def tensors(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "components": self.components, "eigenvalues": self.eigenvalues}

    def state_shapes(self, group: int, feature: int) -> dict[str, tuple[int, ...]]:
        return {"mean": (group, feature), "components": (group, feature, self.rank), "eigenvalues": (group, feature)}

    def set_tensors(self, state: dict[str, Tensor]) -> None:
        self.mean, self.components, self.eigenvalues = state["mean"], state["components"], state["eigenvalues"]

    # -- application ------------------------------------------------------------------
    def derive(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        v = self.components.to(device=device, dtype=torch.float64)  # [group, feature, rank]
        projector = v @ v.transpose(1, 2)
        mean = self.mean.to(device=device, dtype=torch.float64)
        offset = mean - (mean.unsqueeze(1) @ projector).squeeze(1)  # mu (I - V V^T)
        cast = {"offset": offset.to(dtype)}
        if 2 * self.rank < v.shape[1]:  # two thin matmuls beat one square one
            return {**cast, "down": v.to(dtype), "up": v.transpose(1, 2).contiguous().to(dtype)}
        return {**cast, "projector": projector.to(dtype)}

    def apply(self, x: Tensor) -> Tensor:
        d = self.derived(x)
        if x.shape[1] == 1:
            flat = x[:, 0]
            if "projector" in d:
                return torch.addmm(d["offset"][0], flat, d["projector"][0]).unsqueeze(1)
            return torch.addmm(d["offset"][0], flat @ d["down"][0], d["up"][0]).unsqueeze(1)
        by_group = x.transpose(0, 1)
        bias = d["offset"].unsqueeze(1)
        if "projector" in d:
            return torch.baddbmm(bias, by_group, d["projector"]).transpose(0, 1)
        return torch.baddbmm(bias, by_group @ d["down"], d["up"]).transpose(0, 1)


@register_simplifier
class SVD(PCA):
    """Uncentred PCA: project onto the top-``rank`` right singular vectors of the activations."""

    method: ClassVar[str] = "svd"

    def __init__(self, rank: int, per_head: bool | None = None):
        super().__init__(rank, center=False, per_head=per_head)

    def options(self) -> dict[str, Any]:
        options = super().options()
        del options["center"]
        return options
