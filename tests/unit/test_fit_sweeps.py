"""Fitting many proxies at once: one forward pass over the fit data, shared accumulators, results equal to
fitting each proxy alone; PCA's float32 Gram matrix keeps float64 accuracy when the mean dwarfs the spread."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import illusion_probe as ip
from illusion_probe.backends import Backend
from illusion_probe.simplify.pca import Moments
from illusion_probe.sweeps import sweep_simplifiers

KEYS = ["blocks.1.attn.hook_k", "blocks.1.attn.hook_q"]
RESID = ["blocks.0.hook_resid_post"]


def _wanted() -> dict[str, dict[str, ip.Simplifier]]:
    return {**sweep_simplifiers(KEYS, "pca", (1, 2, 4)), **sweep_simplifiers(RESID, "svd", (3, 8)),
            **sweep_simplifiers(KEYS, "kmeans", (2, 3), seed=4), **sweep_simplifiers(RESID, "kmeans", (2,)),
            **sweep_simplifiers(KEYS, "mean_ablation")}


def test_a_sweep_is_one_forward_pass_and_equals_fitting_each_proxy_alone(native_bridge, random_train_split) -> None:
    with mock.patch.object(Backend, "run", autospec=True, side_effect=Backend.run) as forward:
        together = ip.fit_proxies(native_bridge, _wanted(), random_train_split, batch_size=8)
    # 15 proxies at 3 hooks: each batch of 8 fit sequences runs once (other calls probe hook shapes on 2 tokens)
    assert [call.args[1].shape[0] for call in forward.call_args_list if call.args[1].shape[1] > 2] == [8, 8, 8]
    for name, simplifiers in _wanted().items():
        alone = ip.fit_proxy(native_bridge, simplifiers, random_train_split, batch_size=8, name=name)
        assert together[name].same_edit(alone), name
        assert together[name].fit_info == alone.fit_info
    ranks = [together[f"pca({r})@blocks.1.attn.hook_k+hook_q"].simplifiers[KEYS[0]] for r in (1, 2, 4)]
    assert all(torch.equal(r.components, ranks[-1].components[..., : r.rank]) for r in ranks)  # one basis


def test_shared_accumulators_are_refused_across_families_or_options() -> None:
    acts = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    leader = ip.PCA(2).partial_fit(acts)
    with pytest.raises(ip.IllusionProbeError, match="same sharing_key"):
        ip.SVD(2).share_accumulated(leader)
    with pytest.raises(ip.IllusionProbeError, match="same sharing_key"):
        ip.KMeans(2, seed=1).share_accumulated(ip.KMeans(3, seed=2).partial_fit(acts))
    follower = ip.PCA(4).share_accumulated(leader).finalize()
    assert torch.equal(follower.components[..., :2], leader.finalize().components)


def _principal_angle_sine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of orthonormal ``a`` and ``b``: the norm of
    ``a``'s part outside ``b``'s span (well conditioned, unlike ``sqrt(1 - cos^2)`` for float32 vectors)."""
    a, b = a.double(), b.double()
    return float(torch.linalg.matrix_norm(a - b @ (b.T @ a), ord=2))


@pytest.mark.parametrize("mean", [1e4, 0.5], ids=["mean_dwarfs_spread", "mean_within_spread"])
@pytest.mark.parametrize("center", [True, False], ids=["pca", "svd"])
def test_float32_gram_matches_float64(center: bool, mean: float) -> None:
    generator = torch.Generator().manual_seed(0)
    d, rank = 32, 6
    scales = torch.linspace(2.0, 0.2, d, dtype=torch.float64)  # distinct variances, standard deviation ~1
    basis = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]
    x64 = mean + (torch.randn(60_000, d, generator=generator, dtype=torch.float64) * scales) @ basis.T
    x = x64.float()
    fitted = ip.PCA(rank, center=center)
    for batch in x.split(5000):  # streamed, as from a model's hooks
        fitted.partial_fit(batch)
    fitted.finalize()
    exact = x.double()  # the float64 reference fits the same (float32-rounded) samples
    second = torch.cov(exact.T, correction=0) if center else exact.T @ exact / len(exact)
    reference = torch.linalg.eigh(second)[1].flip(-1)[:, :rank]
    assert _principal_angle_sine(fitted.components[0], reference) < 1e-4
    if center:
        assert torch.allclose(fitted.mean[0].double(), exact.mean(0), rtol=0, atol=1e-3)


def test_moments_memory_does_not_grow_with_rows() -> None:
    moments = Moments((1, 8), torch.device("cpu"))
    for _ in range(5):
        assert moments.add(100.0 + torch.randn(100_000, 1, 8))  # a mean beyond the spread: chunks are shifted copies
    assert moments.n == 500_000
    assert moments._buffer is not None and moments._buffer.shape[0] * 8 <= Moments.CHUNK_ELEMENTS


def test_moments_shift_only_where_the_mean_exceeds_the_spread() -> None:
    generator = torch.Generator().manual_seed(0)
    centred = Moments((2, 4), torch.device("cpu"))
    assert centred.add(0.5 + torch.randn(1000, 2, 4, generator=generator))  # |mean| < std: no shift, no copy
    assert centred.shift is not None and not centred.shift.any() and centred._buffer is None
    offset = torch.randn(1000, 2, 4, generator=generator)
    offset[:, 1, 3] += 3.0  # one feature of one group is enough
    shifted = Moments((2, 4), torch.device("cpu"))
    assert shifted.add(offset)
    assert shifted.shift is not None and torch.equal(shifted.shift, offset.mean(0))


def test_moments_refuse_a_batch_with_nan_and_keep_what_they_had() -> None:
    moments = Moments((1, 3), torch.device("cpu"))
    good = torch.randn(20, 1, 3, generator=torch.Generator().manual_seed(0))
    assert moments.add(good)
    before = (moments.n, moments.sum.clone(), moments.gram.clone())
    bad = good.clone()
    bad[7, 0, 1] = float("inf")
    assert not moments.add(bad)
    assert moments.n == before[0] and torch.equal(moments.sum, before[1]) and torch.equal(moments.gram, before[2])
