"""Verdicts: is each featured proxy less faithful out of distribution, and do the seeds agree?

The report's verdict table and the cross-seed summary read the same cells: per featured proxy (each
swept family's headline proxy and every size-free proxy) and OOD split, its agreement gap to the
in-distribution split, plain (category ``all``), difficulty-matched and after refitting on the OOD split
(``refit_ceiling``). A cell is ``worse`` (less faithful out of distribution) or ``better`` only when its
gap is significant at :data:`ALPHA` after a Holm correction across every such cell of one run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from illusion_probe import stats
from illusion_probe.errors import require
from illusion_probe.results import MATCHED, Gap, Results

#: Significance level of a verdict, after the Holm correction.
ALPHA = 0.05
#: The metric verdicts are read on.
VERDICT_METRIC = "agreement"
#: Gap categories that carry a verdict (a positive gap means "less faithful out of distribution").
MARKED = ("all", MATCHED, "refit_ceiling")


def featured_proxies(results: Results) -> list[str]:
    """The headline proxy of each swept family plus every size-free proxy (one-hot attention, ablations)."""
    chosen = [row["proxy"] for row in results.headline()]
    sizeless = [r.proxy for r in results.records if r.size is None]
    return list(dict.fromkeys([*chosen, *sizeless]))


def verdict_gaps(results: Results, proxies: list[str]) -> tuple[dict[tuple[str, str, str], Gap], dict[int, float]]:
    """The verdict table's agreement gaps of ``proxies`` on the first in-distribution split, keyed by ``(proxy,
    category, ood_split)``, and the Holm-adjusted p-value of each gap in a :data:`MARKED` category (keyed by ``id``)."""
    id_splits = results.splits_with_role("id")
    if not id_splits:
        return {}, {}
    gaps = {(g.proxy, g.category, g.ood_split): g for g in results.gaps
            if g.metric == VERDICT_METRIC and g.id_split == id_splits[0] and not g.hook and g.proxy in proxies}
    family = [g for (_, category, _), g in gaps.items() if category in MARKED]
    return gaps, dict(zip(map(id, family), stats.holm([g.p_value for g in family]), strict=True))


def direction(results: Results, gap: Gap, adjusted_p: float) -> str:
    """``"worse"`` / ``"better"`` when the gap is significant after correction (``adjusted_p`` < :data:`ALPHA`) and
    says the proxy is less / more faithful out of distribution; ``""`` otherwise."""
    higher_is_better = results.metric_info(gap.metric).higher_is_better
    if higher_is_better is None or not (math.isfinite(adjusted_p) and adjusted_p < ALPHA) or gap.value == 0:
        return ""
    return "worse" if (gap.value > 0) == higher_is_better else "better"


def _family(results: Results, proxy: str) -> str:
    """``method@hooks`` for a swept proxy (its size differs between seeds), else the proxy's own name."""
    record = next(r for r in results.records if r.proxy == proxy)
    return proxy if record.size is None else f"{record.method}@{proxy.partition('@')[2]}"


def seed_agreement(results_by_seed: Mapping[int, Results]) -> list[dict[str, Any]]:
    """How many seeds give each verdict, per featured proxy family, OOD split and :data:`MARKED` category.

    Each row: ``family``, ``ood_split``, ``category``, ``seeds`` (those with this cell), ``worse``, ``better`` and
    ``not_significant`` (counts of seeds), ``gaps``, ``adjusted_p`` and ``intervals`` (per seed, ``{seed: value}``;
    an interval is ``[low, high]``, simultaneous at 95% across the seed's cells, Bonferroni:
    :func:`~illusion_probe.stats.simultaneous_interval`) and ``proxies`` (the headline proxy each seed chose,
    which may differ in size).
    """
    require(len(results_by_seed) >= 1, "seed_agreement needs the results of at least one seed")
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for seed, results in sorted(results_by_seed.items()):
        gaps, adjusted = verdict_gaps(results, featured_proxies(results))
        for (proxy, category, ood), gap in gaps.items():
            if category not in MARKED:
                continue
            key = (_family(results, proxy), ood, category)
            row = rows.setdefault(key, {"family": key[0], "ood_split": ood, "category": category, "seeds": 0,
                                        "worse": 0, "better": 0, "not_significant": 0, "gaps": {}, "adjusted_p": {},
                                        "intervals": {}, "proxies": {}})
            verdict = direction(results, gap, adjusted[id(gap)]) or "not_significant"
            row["seeds"] += 1
            row[verdict] += 1
            row["gaps"][seed], row["adjusted_p"][seed], row["proxies"][seed] = gap.value, adjusted[id(gap)], proxy
            row["intervals"][seed] = list(stats.simultaneous_interval(gap.value, gap.ci_low, gap.ci_high, len(adjusted),
                                                                      ALPHA))
    return list(rows.values())
