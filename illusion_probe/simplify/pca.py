"""Low-rank projection: PCA (centred) and SVD (uncentred).

Fitting streams batches into a mean and Gram matrix on the activations' device
(:class:`Moments`: shifted, multiplied in float32, summed in float64; memory
independent of the number of tokens), then runs a single symmetric
eigendecomposition, shared by every rank of a sweep. Applying computes
``x_hat = mu + (x - mu) V V^T`` (``mu = 0`` for SVD) in the activation's dtype,
with either the precomputed projector ``V V^T`` or two thin matmuls, whichever
is cheaper for the rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from illusion_probe.distributed import all_reduce, broadcast
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
    checks_finite: ClassVar[bool] = True  # the Gram matrix of a batch with NaN or inf is not finite either

    def __init__(self, rank: int, center: bool = True, per_head: bool | None = None):
        super().__init__(per_head)
        require(isinstance(rank, int) and not isinstance(rank, bool) and rank > 0,
                f"{type(self).__name__}: rank must be a positive integer, got {rank!r}")
        self.rank = rank
        self.center = bool(center)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "rank": self.rank, "center": self.center}

    def random_baseline(self) -> FittedSimplifier | None:
        from illusion_probe.simplify.random_baselines import RandomSubspace  # it subclasses this class

        return RandomSubspace(self.rank, center=self.center, per_head=self.per_head)

    # -- fitting ----------------------------------------------------------------------
    def check_feature_dim(self, feature: int) -> None:
        require(self.rank <= feature, f"{self.describe()}: rank {self.rank} exceeds the feature dimension {feature}")

    def sharing_key(self) -> Hashable:
        return self.center  # every rank is the leading part of one eigendecomposition

    def adopt(self, leader: FittedSimplifier) -> None:
        assert isinstance(leader, PCA)
        self._moments = leader._moments

    def start(self, shape: tuple[int, int], device: torch.device) -> None:
        self._moments = Moments(shape, device)

    def accumulate(self, x: Tensor) -> None:
        require(self._moments.add(x), self._not_finite())

    def combine_accumulators(self) -> None:
        self._moments.combine()

    def drop_accumulators(self) -> None:
        vars(self).pop("_moments", None)

    def finish(self) -> None:
        mean, self.eigenvalues, vectors = self._moments.spectrum(self.center)
        self.components = vectors[..., : self.rank].to(torch.float32)
        self.mean = mean.to(torch.float32)
        # The moments are exact to float32 precision of the *centred* spread (the shift removes the mean).
        largest_variance = self._moments.spectrum(center=True)[1][..., :1]
        del self._moments
        self._warn_beyond_numerical_rank(largest_variance)

    def _warn_beyond_numerical_rank(self, largest_variance: Tensor) -> None:
        """Warn when ``rank`` exceeds the fitted data's numerical rank: the extra directions are arbitrary.

        Numerical rank as ``numpy.linalg.matrix_rank`` counts it for a float32 covariance matrix: eigenvalues
        above ``largest_variance * feature * eps(float32)``, where ``largest_variance`` is the covariance's
        largest eigenvalue ``[group, 1]``, the scale to which float32 products of shifted samples are exact
        (SVD's second moment may be far larger when the mean is large; its directions are resolved all the same).
        """
        tolerance = largest_variance * self.eigenvalues.shape[-1] * torch.finfo(torch.float32).eps
        numerical = int((self.eigenvalues > tolerance).sum(-1).min())
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


class Moments:
    """Streamed mean and second moment of ``[n, group, feature]`` samples, and their eigendecomposition.

    Each batch is multiplied in the samples' own precision (at least float32), in chunks of at most
    ``CHUNK_ELEMENTS``, and the products are summed in float64, so memory does not grow with the number
    of rows. Where the mean of the first chunk is larger than its spread in some feature, every chunk is
    first shifted by that mean (a copy): float32 products of unshifted samples would then lose the spread
    to rounding. Elsewhere the shift is zero and costs nothing, and the rounding error is at most twice
    that of centred samples (``|mean| <= std`` in every feature). :meth:`spectrum` is computed once per
    centring and shared by every rank fitted from these moments.

    Precision: the float32 products leave the eigenvalues of directions without variance at about
    1e-8 to 1e-7 of the largest (measured on exactly low-rank data), against 1e-15 in float64; that is
    what PCA's numerical-rank warning allows for.
    """

    #: Elements (rows x features) multiplied at once: large enough for fast matrix products,
    #: small enough to bound memory (16 MiB of float32).
    CHUNK_ELEMENTS = 2**22

    def __init__(self, shape: tuple[int, int], device: torch.device):
        groups, feature = shape
        self.n = 0
        self.shift: Tensor | None = None  # [group, feature]: the first chunk's mean, or zero (see above)
        self.sum = torch.zeros(groups, feature, dtype=torch.float64, device=device)  # of shifted samples
        self.gram = torch.zeros(groups, feature, feature, dtype=torch.float64, device=device)  # of shifted samples
        self._buffer: Tensor | None = None  # reused by every shifted chunk: fresh allocations cost page faults
        self._spectra: dict[bool, tuple[Tensor, Tensor, Tensor]] = {}

    def add(self, x: Float[Tensor, "n group feature"]) -> bool:
        """Accumulate one batch; return ``False``, adding nothing, when it holds NaN or inf."""
        x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        rows = min(x.shape[0], max(1, self.CHUNK_ELEMENTS // (x.shape[1] * x.shape[2])))
        shift = _shift(x[:rows]) if self.shift is None else self.shift
        shifting = bool(shift.any())
        if shifting and (self._buffer is None or self._buffer.dtype != x.dtype or len(self._buffer) < rows):
            self._buffer = torch.empty(rows, *x.shape[1:], dtype=x.dtype, device=x.device)
        gram, total = torch.zeros_like(self.gram), torch.zeros_like(self.sum)
        for chunk in x.split(rows):
            if shifting:
                chunk = torch.sub(chunk, shift, out=self._buffer[: chunk.shape[0]])
            gram += _gram(chunk)
            total += chunk.sum(dim=0)
        if not bool(torch.isfinite(total).all() and torch.isfinite(gram).all()):
            return False
        self.shift = shift
        self.gram += gram
        self.sum += total
        self.n += x.shape[0]
        return True

    def combine(self) -> None:
        """Sum every process's moments into this one's, about the main process's shift (in float64)."""
        assert self.shift is not None, "no samples accumulated"
        main_shift = broadcast(self.shift.to(torch.float64, copy=True))
        delta = self.shift.double() - main_shift  # x - main_shift = (x - shift) + delta, row by row
        outer = self.sum.unsqueeze(-1) * delta.unsqueeze(-2)
        self.gram += outer + outer.transpose(-1, -2) + self.n * delta.unsqueeze(-1) * delta.unsqueeze(-2)
        self.sum += self.n * delta
        total = all_reduce(torch.cat([self.sum.new_tensor([self.n]), self.sum.flatten(), self.gram.flatten()]))
        self.n, self.shift = int(total[0]), main_shift.to(self.shift.dtype)
        self.sum = total[1:1 + self.sum.numel()].view_as(self.sum)
        self.gram = total[1 + self.sum.numel():].view_as(self.gram)

    def spectrum(self, center: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, eigenvalues, eigenvectors)`` of the covariance (``center``) or the uncentred second
        moment, in float64, eigenvalues descending: ``[group, feature]``, ``[group, feature]``,
        ``[group, feature, feature]``; ``mean`` is zero when not centred."""
        if center not in self._spectra:
            assert self.shift is not None, "no samples accumulated"
            self._buffer = None
            offset = self.sum / self.n  # mean of the shifted samples
            second = self.gram / self.n - offset.unsqueeze(-1) * offset.unsqueeze(-2)  # covariance
            mean = self.shift.double() + offset
            if not center:  # E[x x^T] = covariance + mean mean^T
                second = second + mean.unsqueeze(-1) * mean.unsqueeze(-2)
                mean = torch.zeros_like(mean)
            values, vectors = torch.linalg.eigh(second)  # ascending
            self._spectra[center] = (mean, values.flip(-1).clamp_min(0.0), vectors.flip(-1))
        return self._spectra[center]


def _shift(first: Float[Tensor, "n group feature"]) -> Float[Tensor, "group feature"]:
    """The first chunk's mean where it exceeds the standard deviation in some feature, else zeros."""
    mean = first.mean(dim=0)
    beyond_spread = 2 * mean.square() > first.square().mean(dim=0)  # mean^2 > E[x^2] - mean^2, the variance
    return mean if bool(beyond_spread.any()) else torch.zeros_like(mean)


def _gram(x: Float[Tensor, "n group feature"]) -> Float[Tensor, "group feature feature"]:
    """``sum_n x x^T`` per group, in ``x``'s precision, returned in float64."""
    if x.device.type == "cpu":  # NumPy's ``a.T @ a`` is a BLAS syrk: half the work of torch's general product
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf are refused by the caller
            return torch.from_numpy(np.stack([a.T @ a for a in x.numpy().transpose(1, 0, 2)])).double()
    by_group = x.transpose(0, 1)
    return (by_group.transpose(1, 2) @ by_group).double()
