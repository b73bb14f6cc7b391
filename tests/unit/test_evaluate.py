"""evaluate / sweep on a tiny random model: metric identities and a hand-computed check."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import illusion_probe as ip
from tests.helpers import hook_count

SIZES = ip.ModelSizes(d_vocab=13, n_ctx=12)


def _tokens(n: int, high: int, seed: int) -> torch.Tensor:
    return torch.randint(0, high, (n, SIZES.n_ctx), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return ip.build_model(SIZES, ip.ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0))


@pytest.fixture(scope="module")
def splits():
    train = ip.Split.from_tokens(_tokens(48, 13, 0), "train", name="train")
    test = ip.Split.from_tokens(_tokens(40, 13, 1), "id", name="test")
    shifted = ip.Split.from_tokens(_tokens(40, 4, 2), "ood", name="ood_small_vocab")  # only tokens 0-3
    flagged = dataclasses.replace(test, labels={"even_token": test.tokens % 2 == 0})
    return ip.SplitSet([train, flagged, shifted])


def _by(results, proxy, metric, split="test", category="all"):
    (record,) = results.select(proxy=proxy, metric=metric, split=split, category=category)
    return record


def test_identity_proxy_is_perfectly_faithful(model, splits) -> None:
    full = ip.fit_proxy(model, {"blocks.1.hook_resid_pre": ip.PCA(rank=32)}, splits["train"])
    results = ip.evaluate(model, {"full": full}, splits, n_boot=50, progress=False)
    for split in splits:
        assert _by(results, "full", "agreement", split).value == 1.0
        assert _by(results, "full", "kl", split).value == pytest.approx(0.0, abs=1e-5)
        assert _by(results, "full", "ce_score", split).value == pytest.approx(1.0, abs=1e-3)
        ev = results.select(proxy="full", metric="explained_variance", split=split)[0]
        assert ev.value == pytest.approx(1.0, abs=1e-5) and ev.hook == "blocks.1.hook_resid_pre"
        assert _by(results, "full", "acc_proxy", split).value == _by(results, "full", "acc_model", split).value
    assert hook_count(model) == 0


def test_ablation_scores_zero_against_itself(model, splits) -> None:
    zero = ip.fit_proxy(model, {"blocks.0.hook_resid_post": ip.ZeroAblation()}, splits["train"])
    results = ip.evaluate(model, {"zero": zero}, splits, ablation="zero", n_boot=0, progress=False)
    assert _by(results, "zero", "ce_score").value == pytest.approx(0.0, abs=1e-6)


def test_low_rank_agreement_matches_a_hand_computation(model, splits) -> None:
    hook = "blocks.1.attn.hook_k"
    proxy = ip.fit_proxy(model, {hook: ip.PCA(rank=1)}, splits["train"])
    results = ip.evaluate(model, {"r1": proxy}, splits, n_boot=200, progress=False)
    for name, split in splits.items():
        with torch.no_grad():
            clean = model(split.tokens).argmax(-1)
            with proxy.applied(model):
                proxied = model(split.tokens).argmax(-1)
        expected = (clean == proxied)[split.eval_mask].double().mean().item()
        record = _by(results, "r1", "agreement", name)
        assert record.value == pytest.approx(expected, abs=1e-12)
        assert record.ci_low <= record.value <= record.ci_high
        assert record.n_positions == split.n_scored
    attn = results.select(proxy="r1", metric="attn_agreement", split="test")
    assert len(attn) == 1 and 0.0 <= attn[0].value <= 1.0


def test_categories_and_gaps(model, splits) -> None:
    proxy = ip.fit_proxy(model, {"blocks.1.hook_resid_pre": ip.PCA(rank=2)}, splits["train"])
    results = ip.evaluate(model, {"r2": proxy}, splits, n_boot=100, progress=False)
    even = _by(results, "r2", "agreement", "test", "even_token")
    assert even.n_positions == int((splits["test"].eval_mask & splits["test"].labels["even_token"]).sum())
    (gap,) = results.gap("agreement", "test", "ood_small_vocab")
    expected = _by(results, "r2", "agreement", "test").value - _by(results, "r2", "agreement", "ood_small_vocab").value
    assert gap.value == pytest.approx(expected)


def test_sweep_records_sizes_and_headline(model, splits) -> None:
    results = ip.sweep(model, splits, hooks=["blocks.1.hook_resid_pre"], method="pca", sizes=[1, 4, 32],
                       n_boot=0, progress=False)
    sizes = sorted({r.size for r in results.select(metric="agreement", split="test")})
    assert sizes == [1, 4, 32]
    (row,) = results.headline()
    assert row["method"] == "pca" and row["reached"] and row["size"] <= 32


def test_results_are_reproducible(model, splits) -> None:
    def run():
        proxy = ip.fit_proxy(model, {"blocks.1.hook_resid_pre": ip.KMeans(n_clusters=4, seed=0)}, splits["train"])
        return ip.evaluate(model, {"km": proxy}, splits, n_boot=100, seed=3, progress=False).to_dict()["records"]

    assert run() == run()


def test_bad_inputs(model, splits) -> None:
    with pytest.raises(ip.IllusionProbeError, match="at least one proxy"):
        ip.evaluate(model, {}, splits)
    with pytest.raises(ip.IllusionProbeError, match="not an ip.Proxy"):
        ip.evaluate(model, {"x": ip.PCA(rank=2)}, splits)
    proxy = ip.fit_proxy(model, {"blocks.1.hook_resid_pre": ip.PCA(rank=2)}, splits["train"])
    with pytest.raises(ip.IllusionProbeError, match="unknown ablation"):
        ip.evaluate(model, {"p": proxy}, splits, ablation="noise")
    long = ip.Split.from_tokens(torch.zeros(2, SIZES.n_ctx + 4, dtype=torch.long), "ood", name="too_long")
    with pytest.raises(ip.IllusionProbeError, match="n_ctx"):
        ip.evaluate(model, {"p": proxy}, ip.SplitSet([splits["train"], long]))


def test_acc_delta_is_the_paired_difference(model, splits) -> None:
    proxy = ip.fit_proxy(model, {"blocks.1.hook_resid_pre": ip.PCA(rank=1)}, splits["train"])
    results = ip.evaluate(model, {"r1": proxy}, splits, n_boot=200, progress=False)
    for split in splits:
        delta = _by(results, "r1", "acc_delta", split)
        expected = _by(results, "r1", "acc_proxy", split).value - _by(results, "r1", "acc_model", split).value
        assert delta.value == pytest.approx(expected, abs=1e-12)
        assert delta.ci_low <= delta.value <= delta.ci_high


def test_resumed_passes_match_a_hand_computation_on_every_model_family(model_family, random_train_split) -> None:
    """Whether a family resumes at the hooked block (HookedTransformer, native bridges) or runs whole
    (bridges around Hugging Face models), the numbers equal full passes computed by hand."""
    split = random_train_split
    held_out = ip.Split.from_tokens(split.tokens.flip(0), "ood", name="ood_flipped", pad_id=0)
    proxy = ip.fit_proxy(model_family, {"blocks.1.hook_resid_pre": ip.PCA(rank=2)}, split)
    results = ip.evaluate(model_family, {"p": proxy}, ip.SplitSet([split, held_out]), n_boot=0, batch_size=5,
                          progress=False)
    for name, s in (("train", split), ("ood_flipped", held_out)):
        with torch.no_grad():
            clean = model_family(s.tokens)
            with proxy.applied(model_family):
                proxied = model_family(s.tokens)
        expected = (clean.argmax(-1) == proxied.argmax(-1))[s.eval_mask].double().mean().item()
        assert _by(results, "p", "agreement", name).value == pytest.approx(expected, abs=1e-12)
    resumed = results.meta["evaluation"]["resumed_at"]["p"]
    assert resumed == (None if results.meta["backend"] == "bridge_hf" else 1)
    assert hook_count(model_family) == 0


def test_baseline_pass_is_shared_with_a_proxy_making_the_same_edit(model, splits) -> None:
    hooks = ["blocks.1.attn.hook_k", "blocks.1.attn.hook_q"]
    pca = ip.fit_proxy(model, {h: ip.PCA(rank=2) for h in hooks}, splits["train"])
    twin = ip.fit_proxy(model, {h: ip.MeanAblation() for h in reversed(hooks)}, splits["train"])  # the baseline's edit
    other = ip.fit_proxy(model, {h: ip.MeanAblation() for h in hooks}, splits["train"], n_sequences=10)
    shared = ip.evaluate(model, {"pca": pca, "mean": twin}, splits, n_boot=50, progress=False)
    alone = ip.evaluate(model, {"pca": pca, "mean10": other}, splits, n_boot=50, progress=False)
    assert shared.meta["evaluation"]["baseline_shared_with"] == {"+".join(sorted(hooks)): "mean"}
    assert alone.meta["evaluation"]["baseline_shared_with"] == {}
    for split in splits:
        a, b = _by(shared, "pca", "ce_score", split), _by(alone, "pca", "ce_score", split)
        assert (a.value, a.ci_low, a.ci_high) == pytest.approx((b.value, b.ci_low, b.ci_high), rel=1e-9)
        assert _by(shared, "mean", "ce_score", split).value == 0.0


def test_padded_sequences_of_mixed_lengths_match_a_hand_computation(model) -> None:
    tokens = _tokens(50, 12, 5) + 1  # pad id 0 never occurs as a real token
    lengths = torch.randint(2, SIZES.n_ctx + 1, (50,), generator=torch.Generator().manual_seed(6))
    tokens[torch.arange(SIZES.n_ctx)[None, :] >= lengths[:, None]] = 0
    ragged = ip.Split.from_tokens(tokens, "id", name="test", pad_id=0)
    train = ip.Split.from_tokens(_tokens(20, 13, 7), "train", name="train")
    proxy = ip.fit_proxy(model, {"blocks.1.hook_resid_pre": ip.PCA(rank=3)}, train)
    results = ip.evaluate(model, {"r3": proxy}, ip.SplitSet([train, ragged]), batch_size=16, n_boot=0, progress=False)
    with torch.no_grad():
        clean = model(tokens)
        with proxy.applied(model):
            proxied = model(tokens)
    mask = ragged.eval_mask
    expected_agreement = (clean.argmax(-1) == proxied.argmax(-1))[mask].double().mean().item()
    expected_kl = torch.nn.functional.kl_div(proxied.log_softmax(-1)[mask], clean.log_softmax(-1)[mask],
                                             log_target=True, reduction="batchmean").item()
    assert _by(results, "r3", "agreement").value == pytest.approx(expected_agreement, abs=1e-12)
    assert _by(results, "r3", "kl").value == pytest.approx(expected_kl, rel=1e-4, abs=1e-7)
    assert _by(results, "r3", "agreement").n_positions == int(mask.sum())


def test_longest_first_batches_cover_every_sequence_once() -> None:
    tokens = _tokens(30, 12, 8) + 1
    lengths = torch.randint(1, SIZES.n_ctx + 1, (30,), generator=torch.Generator().manual_seed(9))
    tokens[torch.arange(SIZES.n_ctx)[None, :] >= lengths[:, None]] = 0
    split = ip.Split.from_tokens(tokens, "id", pad_id=0)
    batches = list(split.batches(7, longest_first=True))
    seen = torch.cat([b.lengths for b in batches])
    assert seen.tolist() == sorted(lengths.tolist(), reverse=True)
    assert all(b.tokens.shape[1] == int(b.lengths.max()) for b in batches)  # each trimmed to its longest
    assert sorted(map(tuple, torch.cat([torch.nn.functional.pad(b.tokens, (0, SIZES.n_ctx - b.tokens.shape[1]))
                                        for b in batches]).tolist())) == sorted(map(tuple, tokens.tolist()))
