"""Bootstrap machinery, and the built-in metrics' reductions against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from illusion_probe import stats
from illusion_probe.metrics import Agreement, CEScore, ExplainedVariance


def _ratio(totals):
    return totals["num"] / totals["den"]


def _estimate(sums, n_boot, seed):
    resampled = stats.Resampled.of(sums, stats.bootstrap_weights(len(next(iter(sums.values()))), n_boot, seed))
    return resampled.estimate(_ratio, {name: name for name in sums})


def test_ratio_of_sums_point_estimate() -> None:
    est, samples = _estimate({"num": np.array([1.0, 2.0, 0.0]), "den": np.array([2.0, 2.0, 1.0])}, 200, 0)
    assert est.value == 3.0 / 5.0
    assert samples.shape == (200,)
    assert est.ci_low <= est.value <= est.ci_high


def test_interval_narrows_with_more_data() -> None:
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        est, _ = _estimate({"num": rng.binomial(10, 0.8, size=n).astype(float), "den": np.full(n, 10.0)}, 500, 1)
        assert est.ci_low <= est.value <= est.ci_high
        return est.ci_high - est.ci_low

    assert width(2000) < width(50) / 3


def test_bootstrap_is_seeded() -> None:
    assert np.array_equal(stats.bootstrap_weights(10, 5, 3), stats.bootstrap_weights(10, 5, 3))
    assert not np.array_equal(stats.bootstrap_weights(10, 5, 3), stats.bootstrap_weights(10, 5, 4))
    assert (stats.bootstrap_weights(10, 5, 3).sum(axis=1) == 10).all()


def test_no_bootstrap_gives_nan_interval() -> None:
    est, samples = _estimate({"num": np.ones(4), "den": np.ones(4)}, 0, 0)
    assert est.value == 1.0 and np.isnan(est.ci_low) and samples.size == 0


def test_undefined_values_are_nan_without_a_warning() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est, samples = _estimate({"num": np.zeros(4), "den": np.zeros(4)}, 20, 0)
    assert np.isnan(est.value) and np.isnan(est.ci_low) and np.isnan(samples).all()


def test_ce_score_of_perfect_and_ablated_proxy() -> None:
    score = CEScore().reduce
    assert score({"ce_ablated": np.array(5.0), "ce_proxy": np.array(2.0), "ce_model": np.array(2.0)}) == 1.0
    assert score({"ce_ablated": np.array(5.0), "ce_proxy": np.array(5.0), "ce_model": np.array(2.0)}) == 0.0
    assert score({"ce_ablated": np.array(4.0), "ce_proxy": np.array(3.0), "ce_model": np.array(2.0)}) == 0.5
    assert Agreement().reduce({"sum": np.array(3.0), "count": np.array(4.0)}) == 0.75


def test_explained_variance_matches_definition() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5)) + 2.0  # 3 sequences x 4 tokens x 5 features
    x_hat = x + rng.normal(scale=0.3, size=x.shape)
    flat, flat_hat = x.reshape(-1, 5), x_hat.reshape(-1, 5)
    expected = 1 - ((flat - flat_hat) ** 2).sum(1).mean() / ((flat**2).sum(1).mean() - (flat.mean(0) ** 2).sum())
    ev = ExplainedVariance().reduce
    got = ev({"err": ((x - x_hat) ** 2).sum(), "sq": (x**2).sum(), "total": x.sum(axis=(0, 1)), "count": np.array(12.0)})
    assert np.isclose(got, expected)
    assert np.isclose(ev({"err": np.array(0.0), "sq": (x**2).sum(), "total": x.sum(axis=(0, 1)),
                          "count": np.array(12.0)}), 1.0)


def test_resampled_equals_one_product_per_column() -> None:
    rng = np.random.default_rng(0)
    den = rng.random(30) + 1
    total = rng.random((30, 4))
    sums = {"num": rng.random(30), "den": den, "total": total, ("a", "tuple", "key"): den.copy()}
    weights = stats.bootstrap_weights(30, 50, seed=2)
    resampled = stats.Resampled.of(sums, weights)
    for key, values in sums.items():
        np.testing.assert_allclose(resampled.totals[key], values.sum(axis=0))
        np.testing.assert_allclose(resampled.samples[key], weights @ values)
    assert resampled.samples["total"].shape == (50, 4)
    est, boot = resampled.estimate(_ratio, {"num": "num", "den": ("a", "tuple", "key")})
    assert est.value == pytest.approx(sums["num"].sum() / sums["den"].sum())
    np.testing.assert_allclose(boot, (weights @ sums["num"]) / (weights @ sums["den"]))


def test_bootstrap_p_value_is_a_wald_test_with_the_bootstrap_standard_error() -> None:
    from illusion_probe.stats import bootstrap_p_value

    samples = np.random.default_rng(0).normal(0.1, 0.05, size=4000)
    assert bootstrap_p_value(0.1, samples) == pytest.approx(math.erfc(2 / math.sqrt(2)), rel=0.05)  # z = 2: 0.0455
    assert bootstrap_p_value(0.0, samples) == 1.0
    assert bootstrap_p_value(0.5, samples) < 1e-20  # resolves what a count of resamples cannot
    assert bootstrap_p_value(0.0, np.zeros(5)) == 1.0 and bootstrap_p_value(0.2, np.full(5, 0.2)) == 0.0
    assert np.isnan(bootstrap_p_value(0.1, np.array([np.nan, 0.1])))


def test_holm_matches_the_step_down_definition() -> None:
    from illusion_probe.stats import holm

    adjusted = holm([0.01, 0.04, 0.03, float("nan"), 0.5])
    # family of 4: 0.01*4 = 0.04; 0.03*3 = 0.09; 0.04*2 = 0.08 -> raised to 0.09 (monotone); 0.5*1 = 0.5
    assert adjusted[0] == pytest.approx(0.04) and adjusted[2] == pytest.approx(0.09)
    assert adjusted[1] == pytest.approx(0.09) and adjusted[4] == pytest.approx(0.5) and np.isnan(adjusted[3])


def test_simultaneous_intervals_widen_with_the_family_and_cover_jointly() -> None:
    # Normal estimates with standard error 1: the 95% interval is +-1.96; across 20 cells Bonferroni needs +-3.02.
    low, high = stats.simultaneous_interval(0.0, -1.959964, 1.959964, family_size=1)
    assert (low, high) == pytest.approx((-1.959964, 1.959964), abs=1e-6)
    low, high = stats.simultaneous_interval(0.5, 0.5 - 1.959964, 0.5 + 1.959964, family_size=20)
    assert (low, high) == pytest.approx((0.5 - 3.023341, 0.5 + 3.023341), abs=1e-5)
    generator = np.random.default_rng(0)  # 20 true zeros, 2,000 repetitions: all covered in at least 95%
    draws = generator.standard_normal((2000, 20))
    half = stats.simultaneous_interval(0.0, -1.959964, 1.959964, family_size=20)[1]
    assert (np.abs(draws) <= half).all(axis=1).mean() >= 0.94
    assert all(math.isnan(v) for v in stats.simultaneous_interval(0.1, float("nan"), 0.2, family_size=3))
