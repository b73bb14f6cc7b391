"""Per-sequence sums and sequence-level bootstrap confidence intervals.

Every metric is a function of *sums over sequences* (numerators and counts).
Keeping those sums per sequence lets one matrix of bootstrap weights resample
sequences for every metric of a split at once: a resample is a row of
multinomial counts ``W [n_boot, n_seq]``, and a ratio-of-sums statistic is
``(W @ num) / (W @ den)``. Resampling sequences (not tokens) respects the
dependence between positions of one sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap interval (NaN bounds when not bootstrapped)."""

    value: float
    ci_low: float
    ci_high: float


def bootstrap_weights(n_sequences: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_sequences]`` resampling counts (each row multinomial) from a seeded generator.

    Each row counts ``n_sequences`` uniform draws of a sequence index, via one ``bincount``.
    """
    if n_boot <= 0 or n_sequences == 0:
        return np.zeros((0, n_sequences))
    draws = np.random.default_rng(seed).integers(0, n_sequences, size=(n_boot, n_sequences))
    draws += np.arange(n_boot)[:, None] * n_sequences  # row r counts into [r * n, (r + 1) * n)
    return np.bincount(draws.ravel(), minlength=n_boot * n_sequences).reshape(n_boot, n_sequences).astype(np.float64)


@dataclass(frozen=True)
class Resampled:
    """Totals over sequences of a table of per-sequence sums, plain and bootstrap-resampled.

    Attributes:
        totals: name -> the sum over sequences (``[]`` or ``[d]``).
        samples: name -> ``[n_boot]`` or ``[n_boot, d]`` resampled sums.
    """

    totals: dict[str, np.ndarray]
    samples: dict[str, np.ndarray]

    @classmethod
    def of(cls, sums: dict[str, np.ndarray], weights: np.ndarray) -> Resampled:
        """Resample every entry of ``sums`` (each ``[n_seq]`` or ``[n_seq, d]``) with one matrix product.

        Many entries repeat (counts, the model's own terms, sums of a hook's clean input shared
        by every proxy on it): each distinct entry, found by its bytes, is resampled once.
        """
        columns: list[np.ndarray] = []
        span: dict[str, tuple[int, int]] = {}  # entry -> its columns in the stacked matrix
        seen: dict[bytes, tuple[int, int]] = {}  # an entry's bytes -> the columns of its first copy
        width = 0
        for key, values in sums.items():
            fingerprint = np.ascontiguousarray(values).tobytes() + repr(values.shape).encode()
            if fingerprint not in seen:
                columns.append(values.reshape(len(values), -1))
                seen[fingerprint] = (width, width + columns[-1].shape[1])
                width += columns[-1].shape[1]
            span[key] = seen[fingerprint]
        stacked = np.concatenate(columns, axis=1) if columns else np.zeros((weights.shape[1], 0))
        totals, resampled = stacked.sum(axis=0), weights @ stacked
        return cls({k: totals[a:b].reshape(sums[k].shape[1:]) for k, (a, b) in span.items()},
                   {k: resampled[:, a:b].reshape(-1, *sums[k].shape[1:]) for k, (a, b) in span.items()})

    def estimate(self, statistic: Callable[..., np.ndarray | float], **names: str) -> tuple[Estimate, np.ndarray]:
        """Evaluate ``statistic`` on the totals and on each resample; ``names`` maps its arguments to entries.

        ``statistic`` is called once with plain totals and once with ``[n_boot, ...]`` resampled
        totals, so it must broadcast over a leading axis. Returns the estimate and the ``[n_boot]``
        bootstrap samples (NaN where a resample is undefined), so differences between
        independently resampled splits can be bootstrapped too.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            value = float(statistic(**{arg: self.totals[name] for arg, name in names.items()}))
            boot = np.asarray(statistic(**{arg: self.samples[name] for arg, name in names.items()}), dtype=np.float64)
        low, high = interval(boot)
        return Estimate(value, low, high), boot


def estimate(
    statistic: Callable[..., np.ndarray | float], sums: dict[str, np.ndarray], weights: np.ndarray
) -> tuple[Estimate, np.ndarray]:
    """:meth:`Resampled.estimate` of ``statistic`` on ``sums`` (keys named as its arguments).

    Args:
        statistic: maps keyword totals (each summed over sequences; vectors keep their
            trailing dimension) to a value; must broadcast over a leading axis.
        sums: per-sequence sums, each ``[n_seq]`` or ``[n_seq, d]``.
        weights: ``[n_boot, n_seq]`` from :func:`bootstrap_weights`.
    """
    return Resampled.of(sums, weights).estimate(statistic, **{k: k for k in sums})


def interval(samples: np.ndarray) -> tuple[float, float]:
    """Percentile interval of the finite ``samples`` (NaN, NaN when there are none)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Mean as a ratio of sums."""
    return num / den


def ratio_difference(a: np.ndarray, b: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Difference of two means over the same positions, ``(a - b) / den``: paired, so shared noise cancels."""
    return (a - b) / den


def ce_score(ce_ablated: np.ndarray, ce_proxy: np.ndarray, ce_model: np.ndarray) -> np.ndarray:
    """(CE_ablated - CE_proxy) / (CE_ablated - CE_model); the common count of positions cancels."""
    return (ce_ablated - ce_proxy) / (ce_ablated - ce_model)


def explained_variance(err: np.ndarray, sq: np.ndarray, total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) from per-sequence sums of each term."""
    mean = total / count[..., None]
    variance = sq / count - (mean**2).sum(axis=-1)
    return 1.0 - (err / count) / variance
