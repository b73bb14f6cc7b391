"""Scoring that fits any model: other output vocabularies, targets that are not the next token, honest PCA."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import illusion_probe as ip
from illusion_probe.backends import Backend


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    """A native bridge whose output vocabulary (7 labels) differs from its input vocabulary (20 tokens)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, d_vocab_out=7,
                                  n_ctx=10, act_fn="relu", normalization_type="LN", seed=0)
    return TransformerBridge.boot_native(cfg, device="cpu").eval()


def _labelled(n: int, seed: int, role: str, name: str) -> ip.Split:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 20, (n, 10), generator=gen)
    return ip.Split.from_scored(tokens, eval_mask=tokens % 2 == 0, targets=tokens % 7, role=role, name=name)


def test_a_model_with_another_output_vocabulary(classifier) -> None:
    assert (Backend.of(classifier).d_vocab, Backend.of(classifier).d_vocab_out) == (20, 7)
    splits = ip.SplitSet([_labelled(30, 0, "train", "train"), _labelled(20, 1, "id", "test"),
                          _labelled(20, 2, "ood", "ood_x")])
    proxy = ip.fit_proxy(classifier, {"blocks.1.hook_resid_pre": ip.PCA(rank=2)}, splits["train"])
    results = ip.evaluate(classifier, {"p": proxy}, splits, n_boot=20, progress=False)
    split = splits["test"]
    with torch.no_grad():
        clean = classifier(split.tokens)
    expected = (clean.argmax(-1) == split.targets)[split.eval_mask].double().mean().item()
    assert results.value("test", "p", "acc_model") == pytest.approx(expected, abs=1e-12)
    assert results.select(split="test", proxy="p", metric="agreement")[0].n_positions == split.n_scored
    narrowed = ip.evaluate(classifier, {"p": proxy}, splits, answer_ids=[0, 1, 2], n_boot=0, progress=False)
    assert narrowed.value("test", "p", "acc_model") <= 1.0
    # Every output id in order takes a plain argmax; the same ids in another order the general path: same numbers.
    everything = ip.evaluate(classifier, {"p": proxy}, splits, answer_ids=list(range(7)), n_boot=0, progress=False)
    shuffled = ip.evaluate(classifier, {"p": proxy}, splits, answer_ids=[3, 6, 0, 5, 1, 4, 2], n_boot=0, progress=False)
    default = ip.evaluate(classifier, {"p": proxy}, splits, n_boot=0, progress=False)
    for other in (everything, shuffled):
        assert [r.metric for r in other.records] == [r.metric for r in default.records]
        np.testing.assert_array_equal([r.value for r in other.records], [r.value for r in default.records])
    with pytest.raises(ip.IllusionProbeError, match=r"answer_ids must lie in the model's output vocabulary \[0, 7\)"):
        ip.evaluate(classifier, {"p": proxy}, splits, answer_ids=[3, 9], progress=False)
    bad = ip.Split.from_scored(split.tokens, split.eval_mask, torch.full_like(split.tokens, 9), name="test")
    with pytest.raises(ip.IllusionProbeError, match="targets outside the model's output vocabulary"):
        ip.evaluate(classifier, {"p": proxy}, ip.SplitSet([splits["train"], bad]), progress=False)


def test_scored_splits_and_padding_are_checked() -> None:
    tokens = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    split = ip.Split.from_scored(tokens, tokens > 1, tokens * 2, role="id", pad_id=0)
    assert split.real_mask.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert split.targets.tolist() == [[0, 4, 6, 0], [8, 10, 0, 0]]
    with pytest.raises(ip.IllusionProbeError, match="padding must be on the right"):
        ip.Split.from_tokens(torch.tensor([[0, 2, 3]]), "id", pad_id=0)
    with pytest.raises(ip.IllusionProbeError, match="eval_mask scores a padded position"):
        ip.Split.from_scored(tokens, torch.ones_like(tokens, dtype=torch.bool), tokens, pad_id=0)
    with pytest.raises(ip.IllusionProbeError, match="eval_mask must be a bool tensor"):
        ip.Split.from_scored(tokens, tokens, tokens)


def test_pca_warns_beyond_the_numerical_rank_and_records_the_spectrum(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.randn(200, 3, generator=gen) @ torch.randn(3, 12, generator=gen)  # rank 3 in 12 dimensions
    with pytest.warns(ip.IllusionProbeWarning, match=r"numerical rank 3, so 2 of the kept directions are arbitrary"):
        ip.PCA(rank=5).fit(low_rank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted = ip.PCA(rank=3).fit(low_rank)
    ratio = fitted.config()["explained_variance_ratio"]
    assert len(ratio) == 1 and len(ratio[0]) == 3 and sum(ratio[0]) == pytest.approx(1.0, abs=1e-5)
    model = ip.build_model(ip.ModelSizes(d_vocab=12, n_ctx=8), ip.ModelConfig(n_layers=1, d_model=16, n_heads=2))
    split = ip.Split.from_tokens(torch.randint(0, 12, (20, 8), generator=gen), "train", name="train")
    ip.fit_proxy(model, {"blocks.0.hook_resid_pre": ip.PCA(rank=4)}, split).save(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "metadata.json").read_text())["hooks"][0]["simplifier"]
    assert len(saved["explained_variance_ratio"][0]) == 4
