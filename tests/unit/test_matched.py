"""Gaps at matched in-distribution fidelity: linear interpolation between the bracketing reference proxies."""

from __future__ import annotations

import pytest

from illusion_probe.analysis.matched import matched_gaps
from illusion_probe.errors import IllusionProbeError
from illusion_probe.results import Gap, Record, Results


def _record(proxy: str, method: str, value: float) -> Record:
    return Record(split="test", role="id", proxy=proxy, method=method, size=1, category="all",
                  metric="explained_variance", value=value, ci_low=value, ci_high=value, n_positions=10,
                  n_sequences=2, hooks="h", hook="h")


def _gap(proxy: str, method: str, value: float) -> Gap:
    return Gap(proxy=proxy, method=method, size=1, category="all", metric="agreement", id_split="test",
               ood_split="ood", value=value, ci_low=value - 0.01, ci_high=value + 0.02)


def test_the_reference_gap_is_interpolated_at_the_compared_fidelity() -> None:
    records = [_record("pca(1)", "pca", 0.5), _record("pca(2)", "pca", 0.9), _record("pca(4)", "pca", 1.0),
               _record("sae(8)", "sae", 0.7), _record("sae(2)", "sae", 0.4)]
    gaps = [_gap("pca(1)", "pca", 0.10), _gap("pca(2)", "pca", 0.30), _gap("pca(4)", "pca", 0.0),
            _gap("sae(8)", "sae", 0.5), _gap("sae(2)", "sae", 0.9)]
    rows = matched_gaps(Results(records=records, gaps=gaps), ("sae", "h"), ("pca", "h"))
    assert len(rows) == 1  # sae(2) lies below every reference fidelity: nothing to interpolate
    row = rows[0]
    assert (row.proxy, row.fidelity, row.gap, row.bracket) == ("sae(8)", 0.7, 0.5, ("pca(1)", "pca(2)"))
    assert row.reference_gap == pytest.approx(0.20)  # halfway between 0.10 and 0.30
    assert (row.reference_ci_low, row.reference_ci_high) == (pytest.approx(0.19), pytest.approx(0.22))


def test_a_family_without_fidelity_is_a_one_line_error() -> None:
    with pytest.raises(IllusionProbeError, match="need 'explained_variance' on 'test'"):
        matched_gaps(Results(records=[_record("pca(1)", "pca", 0.5)], gaps=[]), ("sae", "h"), ("pca", "h"))


def test_a_family_gap_at_a_fidelity_between_two_sizes() -> None:
    from illusion_probe.analysis.matched import gaps_at

    records = [_record("pca(1)", "pca", 0.5), _record("pca(2)", "pca", 0.9)]
    gaps = [_gap("pca(1)", "pca", 0.10), _gap("pca(2)", "pca", 0.30)]
    (at,) = gaps_at(Results(records=records, gaps=gaps), ("pca", "h"), 0.6)
    assert (at.ood_split, at.bracket) == ("ood", ("pca(1)", "pca(2)")) and at.value == pytest.approx(0.15)
    assert gaps_at(Results(records=records, gaps=gaps), ("pca", "h"), 0.95) == []  # beyond the family's range
