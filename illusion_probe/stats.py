"""Sequence-level bootstrap confidence intervals from per-sequence sums.

Every metric is a function of *sums over sequences* (numerators and counts).
Keeping those sums per sequence lets one matrix of bootstrap weights resample
sequences for every metric of a split at once: a resample is a row of
multinomial counts ``W [n_boot, n_seq]``, and the resampled totals are
``W @ sums``. Resampling sequences (not tokens) respects the dependence
between positions of one sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
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
        totals: key -> the sum over sequences (``[]`` or ``[d]``).
        samples: key -> ``[n_boot]`` or ``[n_boot, d]`` resampled sums.
    """

    totals: dict[Hashable, np.ndarray]
    samples: dict[Hashable, np.ndarray]

    @classmethod
    def of(cls, sums: Mapping[Hashable, np.ndarray], weights: np.ndarray) -> Resampled:
        """Resample every entry of ``sums`` (each ``[n_seq]`` or ``[n_seq, d]``) with one matrix product."""
        keys = list(sums)
        columns = [np.asarray(sums[key], dtype=np.float64).reshape(weights.shape[1], -1) for key in keys]
        bounds = np.cumsum([0] + [c.shape[1] for c in columns])
        stacked = np.concatenate(columns, axis=1) if columns else np.zeros((weights.shape[1], 0))
        totals, resampled = stacked.sum(axis=0), weights @ stacked
        shapes = {key: np.shape(sums[key])[1:] for key in keys}
        return cls({k: totals[a:b].reshape(shapes[k]) for k, a, b in zip(keys, bounds[:-1], bounds[1:], strict=True)},
                   {k: resampled[:, a:b].reshape(-1, *shapes[k]) for k, a, b in zip(keys, bounds[:-1], bounds[1:],
                                                                                   strict=True)})

    def estimate(self, statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray],
                 names: Mapping[str, Hashable]) -> tuple[Estimate, np.ndarray]:
        """Evaluate ``statistic`` on the totals and on every resample.

        Args:
            statistic: maps ``{term: total}`` to a value; called once with plain totals and once with
                ``[n_boot, ...]`` resampled totals, so it must broadcast over a leading axis.
            names: term name -> the key of its column in this table.

        Returns:
            The estimate and the ``[n_boot]`` bootstrap samples (NaN where a resample is undefined),
            so that differences between independently resampled splits can be bootstrapped too.
            Undefined values (0/0) are NaN, without a warning.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            value = float(statistic({term: self.totals[key] for term, key in names.items()}))
            boot = np.asarray(statistic({term: self.samples[key] for term, key in names.items()}), dtype=np.float64)
        low, high = interval(boot)
        return Estimate(value, low, high), boot


def interval(samples: np.ndarray) -> tuple[float, float]:
    """Percentile interval of the finite ``samples`` (NaN, NaN when there are none)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_p_value(estimate: float, differences: np.ndarray) -> float:
    """Two-sided p-value for "the difference is 0": ``estimate`` over the standard deviation of its resamples,
    referred to the normal distribution (a Wald test with a bootstrap standard error).

    NaN without two finite resamples; with resamples that do not vary, 1 for a zero estimate and 0 otherwise.
    The normal reference resolves small p-values, which a count of resamples beyond 0 cannot (at 1,000
    resamples nothing falls below 0.002, too coarse for a correction across many cells).
    """
    finite = differences[np.isfinite(differences)]
    if finite.size < 2 or not math.isfinite(estimate):
        return float("nan")
    spread = float(finite.std(ddof=1))
    if spread == 0.0:
        return 1.0 if estimate == 0 else 0.0
    return math.erfc(abs(estimate) / spread / math.sqrt(2.0))


def simultaneous_interval(estimate: float, ci_low: float, ci_high: float, family_size: int,
                          alpha: float = 1 - CONFIDENCE) -> tuple[float, float]:
    """A Bonferroni interval: ``estimate`` plus or minus ``z(1 - alpha / (2 * family_size))`` standard errors, so
    that ``family_size`` such intervals cover their true values together with probability at least ``1 - alpha``.

    The standard error is read off the 95% percentile interval's width (``(ci_high - ci_low) / (2 z(0.975))``),
    the normal approximation :func:`bootstrap_p_value` makes too. NaN bounds when the interval is missing.
    """
    if not (math.isfinite(ci_low) and math.isfinite(ci_high) and family_size >= 1):
        return float("nan"), float("nan")
    error = (ci_high - ci_low) / (2 * _normal_quantile(1 - (1 - CONFIDENCE) / 2))
    half = _normal_quantile(1 - alpha / (2 * family_size)) * error
    return estimate - half, estimate + half


def _normal_quantile(q: float) -> float:
    """The standard normal's ``q`` quantile."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values over the family ``p_values`` (NaN entries are not in the family and stay NaN).

    The ``i``-th smallest of ``m`` p-values is multiplied by ``m - i`` (``i`` from 0), then made
    non-decreasing in that order and capped at 1; rejecting where the adjusted value is below ``alpha``
    controls the family-wise error rate at ``alpha``.
    """
    values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(values.shape, np.nan)
    present = np.flatnonzero(np.isfinite(values))
    order = present[np.argsort(values[present], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()
