"""Bootstrap machinery and metric formulas against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from illusion_probe import stats


def test_ratio_of_sums_point_estimate() -> None:
    sums = {"num": np.array([1.0, 2.0, 0.0]), "den": np.array([2.0, 2.0, 1.0])}
    est, samples = stats.estimate(stats.ratio, sums, stats.bootstrap_weights(3, 200, seed=0))
    assert est.value == 3.0 / 5.0
    assert samples.shape == (200,)
    assert est.ci_low <= est.value <= est.ci_high


def test_interval_narrows_with_more_data() -> None:
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        correct = rng.binomial(10, 0.8, size=n).astype(float)
        est, _ = stats.estimate(stats.ratio, {"num": correct, "den": np.full(n, 10.0)},
                                stats.bootstrap_weights(n, 500, seed=1))
        assert est.ci_low <= est.value <= est.ci_high
        return est.ci_high - est.ci_low

    assert width(2000) < width(50) / 3


def test_bootstrap_is_seeded() -> None:
    assert np.array_equal(stats.bootstrap_weights(10, 5, 3), stats.bootstrap_weights(10, 5, 3))
    assert not np.array_equal(stats.bootstrap_weights(10, 5, 3), stats.bootstrap_weights(10, 5, 4))
    assert (stats.bootstrap_weights(10, 5, 3).sum(axis=1) == 10).all()


def test_no_bootstrap_gives_nan_interval() -> None:
    est, samples = stats.estimate(stats.ratio, {"num": np.ones(4), "den": np.ones(4)}, stats.bootstrap_weights(4, 0, 0))
    assert est.value == 1.0 and np.isnan(est.ci_low) and samples.size == 0


def test_ce_score_of_perfect_and_ablated_proxy() -> None:
    assert stats.ce_score(np.array(5.0), np.array(2.0), np.array(2.0)) == 1.0
    assert stats.ce_score(np.array(5.0), np.array(5.0), np.array(2.0)) == 0.0
    assert stats.ce_score(np.array(4.0), np.array(3.0), np.array(2.0)) == 0.5


def test_explained_variance_matches_definition() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5)) + 2.0  # 3 sequences x 4 tokens x 5 features
    x_hat = x + rng.normal(scale=0.3, size=x.shape)
    flat, flat_hat = x.reshape(-1, 5), x_hat.reshape(-1, 5)
    expected = 1 - ((flat - flat_hat) ** 2).sum(1).mean() / ((flat**2).sum(1).mean() - (flat.mean(0) ** 2).sum())
    got = stats.explained_variance(err=((x - x_hat) ** 2).sum(axis=(1, 2)).sum(), sq=(x**2).sum(axis=(1, 2)).sum(),
                                   total=x.sum(axis=1).sum(0), count=np.array(12.0))
    assert np.isclose(got, expected)
    assert np.isclose(stats.explained_variance(err=np.array(0.0), sq=(x**2).sum(), total=x.sum(axis=(0, 1)),
                                               count=np.array(12.0)), 1.0)


def test_resampled_equals_one_product_per_column() -> None:
    rng = np.random.default_rng(0)
    den = rng.random(30) + 1
    total = rng.random((30, 4))
    total[:, 2] = den  # repeated columns are resampled once and must come back in every place
    sums = {"num": rng.random(30), "den": den, "total": total, "den_again": den.copy()}
    weights = stats.bootstrap_weights(30, 50, seed=2)
    resampled = stats.Resampled.of(sums, weights)
    for key, values in sums.items():
        np.testing.assert_allclose(resampled.totals[key], values.sum(axis=0))
        np.testing.assert_allclose(resampled.samples[key], weights @ values)
    assert resampled.samples["total"].shape == (50, 4)
    est, boot = resampled.estimate(stats.ratio, num="num", den="den")
    assert est.value == pytest.approx(sums["num"].sum() / sums["den"].sum())
    np.testing.assert_allclose(boot, (weights @ sums["num"]) / (weights @ sums["den"]))
