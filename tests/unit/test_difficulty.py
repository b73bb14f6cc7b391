"""Difficulty-matched metrics: confidence bins of equal mass on the reference split, a split reweighted to its
own mix unchanged, the reweighting formula on a known case, and one-line errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import illusion_probe as ip
from illusion_probe.difficulty import MATCHED, bin_label, matched_records
from illusion_probe.results import Record


@pytest.fixture(scope="module")
def evaluated(native_bridge, random_train_split) -> ip.Results:
    proxy = ip.fit_proxy(native_bridge, {"blocks.1.hook_resid_pre": ip.PCA(2)}, random_train_split)
    test = dataclasses.replace(random_train_split, name="test", role="id")
    same_as_test = dataclasses.replace(random_train_split, name="ood_same", role="ood")
    return ip.evaluate(native_bridge, {"pca": proxy}, {"train": random_train_split, "test": test, "ood_same": same_as_test},
                       n_boot=20, difficulty_bins=4, metrics=["agreement", "kl", "ce_score"], progress=False)


def test_bins_split_the_reference_into_equal_masses(evaluated) -> None:
    counts = [evaluated.select(split="test", metric="agreement", category=bin_label(b))[0].n_positions for b in range(4)]
    total = evaluated.select(split="test", metric="agreement", category="all")[0].n_positions
    assert sum(counts) == total and max(counts) - min(counts) <= 1


def test_a_split_reweighted_to_its_own_mix_is_unchanged(evaluated) -> None:
    for metric in ("agreement", "kl"):
        plain = evaluated.select(split="ood_same", metric=metric, category="all")[0].value
        matched = evaluated.select(split="ood_same", metric=metric, category=MATCHED)[0].value
        assert matched == pytest.approx(plain, rel=1e-12, abs=1e-12)
        (gap,) = [g for g in evaluated.gaps if g.metric == metric and g.category == MATCHED]
        assert gap.value == pytest.approx(0.0, abs=1e-12)
    assert not evaluated.select(metric="ce_score", category=MATCHED)  # not a mean over positions: not matched


def _record(split: str, category: str, value: float, n: int) -> Record:
    return Record(split=split, role="id" if split == "test" else "ood", proxy="p", method="pca", size=1,
                  category=category, metric="agreement", value=value, ci_low=value, ci_high=value, n_positions=n,
                  n_sequences=1)


def test_the_matched_value_weights_each_bin_by_its_reference_share() -> None:
    # reference: bins of 30 and 10 positions; the OOD split is worse in bin 2 and has most positions there
    records = [_record("test", "all", 0.95, 40), _record("test", bin_label(0), 0.9, 30), _record("test", bin_label(1), 1.0, 10),
               _record("ood", "all", 0.7, 100), _record("ood", bin_label(0), 0.9, 10), _record("ood", bin_label(1), 0.6, 90)]
    samples = {(r.split, "p", r.category, "agreement", ""): np.full(3, r.value) for r in records}
    added = {r.split: r for r in matched_records(records, samples, "test", ["agreement"])}
    assert added["test"].value == 0.95  # the reference keeps its own value
    assert added["ood"].value == pytest.approx((30 * 0.9 + 10 * 0.6) / 40)
    assert np.allclose(samples[("ood", "p", MATCHED, "agreement", "")], (30 * 0.9 + 10 * 0.6) / 40)


def test_matching_needs_an_in_distribution_split(native_bridge, random_train_split) -> None:
    proxy = ip.fit_proxy(native_bridge, {"blocks.1.hook_resid_pre": ip.PCA(2)}, random_train_split)
    with pytest.raises(ip.IllusionProbeError, match="give a split with role 'id' or pass 0"):
        ip.evaluate(native_bridge, {"pca": proxy}, {"train": random_train_split}, difficulty_bins=3, progress=False)
    with pytest.raises(ip.IllusionProbeError, match="difficulty_bins must be a non-negative integer"):
        ip.evaluate(native_bridge, {"pca": proxy}, {"train": random_train_split}, difficulty_bins=-1, progress=False)
