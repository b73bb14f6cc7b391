"""Generalization gaps compared at matched in-distribution fidelity.

Two proxy families at one hook (an SAE sweep and a PCA sweep) rarely land on the same explained
variance, so their gaps cannot be read side by side. :func:`matched_gaps` places each proxy of one
family at its in-distribution fidelity ``x`` (mean explained variance over its hooks on the
``id_split``) and compares its gap with the *reference* family's gap at the same ``x``, linearly
interpolated between the two reference proxies whose fidelities bracket ``x``. A proxy outside the
reference family's fidelity range is left out (nothing to interpolate). The reference interval is
interpolated the same way, which is an approximation: the two bracketing intervals come from the
same resamples, and the interpolated one is not itself a bootstrap interval.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from illusion_probe.errors import require
from illusion_probe.results import Gap, Results


@dataclass(frozen=True)
class MatchedGap:
    """One proxy's gap to one OOD split beside the reference family's gap at the same fidelity.

    Attributes:
        proxy: the compared proxy.
        fidelity: its fidelity on the in-distribution split (e.g. explained variance).
        ood_split: the out-of-distribution split.
        gap, ci_low, ci_high: its gap ``metric(id) - metric(ood)`` and 95% bootstrap interval.
        reference_gap, reference_ci_low, reference_ci_high: the reference family's gap at ``fidelity``
            (interpolated; see the module docstring).
        bracket: the two reference proxies interpolated between.
    """

    proxy: str
    fidelity: float
    ood_split: str
    gap: float
    ci_low: float
    ci_high: float
    reference_gap: float
    reference_ci_low: float
    reference_ci_high: float
    bracket: tuple[str, str]


def family_fidelity(results: Results, method: str, hooks: str, id_split: str = "test",
                    fidelity_metric: str = "explained_variance") -> dict[str, float]:
    """``{proxy: fidelity}`` for the proxies of one ``(method, hooks)`` family: ``fidelity_metric`` on
    ``id_split``, averaged over the proxy's hooks."""
    by_proxy: dict[str, list[float]] = {}
    for record in results.select(method=method, hooks=hooks, split=id_split, metric=fidelity_metric, category="all"):
        by_proxy.setdefault(record.proxy, []).append(record.value)
    return {proxy: sum(values) / len(values) for proxy, values in by_proxy.items()}


def matched_gaps(results: Results, family: tuple[str, str], reference: tuple[str, str], metric: str = "agreement",
                 id_split: str = "test", fidelity_metric: str = "explained_variance") -> list[MatchedGap]:
    """Gaps of ``family``'s proxies beside ``reference``'s at the same in-distribution fidelity.

    Args:
        results: evaluated results holding both families, their fidelities and their gaps.
        family: ``(method, hooks)`` of the compared family, as in the records (e.g.
            ``("sae", "blocks.1.hook_resid_pre")``).
        reference: ``(method, hooks)`` of the reference family (e.g. ``("pca", "blocks.1.hook_resid_pre")``).
        metric: the gapped metric.
        id_split: the in-distribution split gaps are taken from and fidelity is measured on.
        fidelity_metric: the fidelity measure (a hook metric such as ``explained_variance``).

    Returns:
        One :class:`MatchedGap` per compared proxy within the reference range and OOD split.
    """
    compared = family_fidelity(results, *family, id_split, fidelity_metric)
    require(bool(compared) and len(family_fidelity(results, *reference, id_split, fidelity_metric)) >= 2,
            f"matched_gaps: need {fidelity_metric!r} on {id_split!r} for the family {family} and for at least two "
            f"proxies of the reference {reference}")
    gaps = _gaps(results, metric, id_split)
    rows = []
    for proxy, x in compared.items():
        for at in gaps_at(results, reference, x, metric, id_split, fidelity_metric):
            gap = gaps.get((proxy, at.ood_split))
            if gap is not None:
                rows.append(MatchedGap(proxy, x, at.ood_split, gap.value, gap.ci_low, gap.ci_high, at.value,
                                       at.ci_low, at.ci_high, at.bracket))
    return rows


@dataclass(frozen=True)
class GapAt:
    """A family's gap to one OOD split at a given fidelity, interpolated between the two proxies bracketing it.

    Attributes:
        fidelity: the fidelity it is taken at.
        ood_split: the out-of-distribution split.
        value, ci_low, ci_high: the interpolated gap and interval (see the module docstring).
        bracket: the two proxies interpolated between.
    """

    fidelity: float
    ood_split: str
    value: float
    ci_low: float
    ci_high: float
    bracket: tuple[str, str]


def gaps_at(results: Results, family: tuple[str, str], fidelity: float, metric: str = "agreement",
            id_split: str = "test", fidelity_metric: str = "explained_variance",
            fidelity_split: str | None = None) -> list[GapAt]:
    """``family``'s gap to every OOD split at in-distribution ``fidelity``: linear in fidelity between the two
    proxies whose fidelities bracket it; empty when ``fidelity`` lies outside the family's range.

    Args:
        results: evaluated results holding the family, its fidelities and its gaps.
        family: ``(method, hooks)`` as in the records.
        fidelity: where to take the gap, in units of ``fidelity_metric``.
        metric: the gapped metric.
        id_split: the in-distribution split the gaps are taken from.
        fidelity_metric: the fidelity measure (``explained_variance``, ``agreement``, ...).
        fidelity_split: where fidelity is measured (default ``id_split``; the headline uses ``val``).
    """
    points = sorted(family_fidelity(results, *family, fidelity_split or id_split, fidelity_metric).items(),
                    key=lambda kv: kv[1])
    xs = [x for _, x in points]
    if len(points) < 2 or not xs[0] <= fidelity <= xs[-1]:
        return []
    upper = min(max(bisect.bisect_left(xs, fidelity), 1), len(xs) - 1)
    (low_proxy, low_x), (high_proxy, high_x) = points[upper - 1], points[upper]
    weight = 0.0 if high_x == low_x else (fidelity - low_x) / (high_x - low_x)
    gaps = _gaps(results, metric, id_split)
    rows = []
    for ood_split in dict.fromkeys(split for _, split in gaps):
        low, high = gaps.get((low_proxy, ood_split)), gaps.get((high_proxy, ood_split))
        if low is not None and high is not None:
            rows.append(GapAt(fidelity, ood_split, _between(low, high, weight, "value"),
                              _between(low, high, weight, "ci_low"), _between(low, high, weight, "ci_high"),
                              (low_proxy, high_proxy)))
    return rows


def _gaps(results: Results, metric: str, id_split: str) -> dict[tuple[str, str], Gap]:
    """``{(proxy, ood split): gap}`` of ``metric`` from ``id_split`` (category ``all``, no hook)."""
    return {(g.proxy, g.ood_split): g for g in results.gaps
            if g.metric == metric and g.id_split == id_split and g.category == "all" and not g.hook}


def _between(low: Gap, high: Gap, weight: float, field: str) -> float:
    return (1 - weight) * getattr(low, field) + weight * getattr(high, field)
