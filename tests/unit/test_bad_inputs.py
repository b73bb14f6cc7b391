"""Every bad input to the Python API that ``docs/reliability.md`` lists, one case each.

A case calls a public entry point with one thing wrong and expects an :class:`ip.IllusionProbeError`
whose message is one line holding the given words, and no hook left on the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import illusion_probe as ip
from illusion_probe.tasks.base import Split
from tests.helpers import hook_count

K, Q, RESID = "blocks.1.attn.hook_k", "blocks.1.attn.hook_q", "blocks.1.hook_resid_pre"


@dataclass(frozen=True)
class Bad:
    """One bad call: ``call(model, train, tmp)`` must raise with ``message`` in its one-line error."""

    id: str
    call: Callable[[torch.nn.Module, Split, Path], object]
    message: str


def _tokens(n: int = 4, length: int = 8, high: int = 50) -> torch.Tensor:
    return torch.randint(1, high, (n, length), generator=torch.Generator().manual_seed(0))


def _split(tokens: torch.Tensor, role: str = "train", name: str = "poked") -> Split:
    """A split built field by field, as a user's own code might, bypassing ``from_tokens``'s checks."""
    ones = torch.ones_like(tokens, dtype=torch.bool)
    return Split(name=name, role=role, tokens=tokens, eval_mask=ones, targets=tokens.clone(), real_mask=ones)


def _pca(model, train, **kwargs):
    return ip.fit_proxy(model, {K: ip.PCA(rank=2)}, train, **kwargs)


def _saved_proxy(model, train, tmp: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
                 meta: Callable[[dict], None] | None = None) -> Path:
    """A fitted PCA proxy saved in ``tmp/p``, its tensors and metadata edited."""
    _pca(model, train).save(tmp / "p")
    if edit is not None:
        tensors = load_file(tmp / "p" / "tensors.safetensors")
        edit(tensors)
        save_file(tensors, tmp / "p" / "tensors.safetensors")
    if meta is not None:
        data = json.loads((tmp / "p" / "metadata.json").read_text())
        meta(data)
        (tmp / "p" / "metadata.json").write_text(json.dumps(data))
    return tmp / "p"


def _evaluate(model, train, splits=None, proxies=None, **kwargs):
    proxies = proxies if proxies is not None else {"p": _pca(model, train)}
    splits = splits if splits is not None else ip.SplitSet([train, Split.from_tokens(_tokens(), "id", name="test")])
    return ip.evaluate(model, proxies, splits, progress=False, n_boot=0, **kwargs)


def _fresh_model() -> torch.nn.Module:
    """A model of the fixture's vocabulary and context but another shape, which a case may spoil."""
    return ip.build_model(ip.ModelSizes(50, 32), ip.ModelConfig(n_layers=2, d_model=16, n_heads=2))


def _set(tensors: dict, key: str, value: torch.Tensor) -> None:
    tensors[key] = value


BAD = [
    # tokens and splits
    Bad("tokens_float", lambda m, t, d: ip.Split.from_tokens(torch.rand(2, 5), "train"), "must be an integer tensor"),
    Bad("tokens_one_dimensional", lambda m, t, d: ip.Split.from_tokens(torch.arange(5), "train"), "must be [n, pos]"),
    Bad("tokens_negative", lambda m, t, d: ip.Split.from_tokens(torch.tensor([[1, -2, 3]]), "train"), "token ids must be >= 0"),
    Bad("tokens_no_sequences", lambda m, t, d: ip.Split.from_tokens(torch.zeros(0, 5, dtype=torch.long), "train"), "has no scored positions"),
    Bad("tokens_one_real_token", lambda m, t, d: ip.Split.from_tokens(torch.tensor([[4, 0, 0]]), "train", pad_id=0), "every sequence needs two real tokens"),
    Bad("split_role_unknown", lambda m, t, d: ip.Split.from_tokens(_tokens(), role="banana"), "role must be one of"),
    Bad("scored_mask_wrong_shape", lambda m, t, d: ip.Split.from_scored(_tokens(), torch.ones(4, 3, dtype=torch.bool), _tokens()), "eval_mask must be a bool tensor of shape (4, 8)"),
    Bad("scored_targets_float", lambda m, t, d: ip.Split.from_scored(_tokens(), torch.ones(4, 8, dtype=torch.bool), torch.rand(4, 8)), "targets must be integer ids"),
    Bad("fit_ids_beyond_vocabulary", lambda m, t, d: _pca(m, _split(_tokens(high=90))), "but the model's vocabulary is [0, 50)"),
    Bad("fit_ids_negative", lambda m, t, d: _pca(m, _split(-_tokens())), "but the model's vocabulary is [0, 50)"),
    Bad("fit_longer_than_context", lambda m, t, d: _pca(m, _split(_tokens(length=40))), "longer than the model's context (n_ctx=32)"),
    Bad("fit_no_real_token", lambda m, t, d: _pca(m, Split(name="empty", role="train", tokens=_tokens(), eval_mask=torch.zeros(4, 8, dtype=torch.bool), targets=_tokens(), real_mask=torch.zeros(4, 8, dtype=torch.bool))), "hold no real token"),
    Bad("fit_on_a_split_set", lambda m, t, d: _pca(m, ip.SplitSet([t])), "split must be an ip.Split, got SplitSet"),
    Bad("fit_on_held_out_split", lambda m, t, d: _pca(m, Split.from_tokens(_tokens(), "ood")), "fitting off the training distribution"),
    Bad("fit_batch_size_zero", lambda m, t, d: _pca(m, t, batch_size=0), "batch_size must be positive"),
    Bad("fit_no_sequences", lambda m, t, d: _pca(m, t, n_sequences=0), "n_sequences must be positive"),
    Bad("fit_no_simplifiers", lambda m, t, d: ip.fit_proxy(m, {}, t), "give at least one"),
    Bad("fit_not_a_simplifier", lambda m, t, d: ip.fit_proxy(m, {K: "pca"}, t), "is a str, not an ip.Simplifier"),
    Bad("fit_unknown_hook", lambda m, t, d: ip.fit_proxy(m, {"blocks.1.attn.hook_kk": ip.PCA(rank=2)}, t), "did you mean"),
    Bad("fit_same_hook_twice", lambda m, t, d: ip.fit_proxy(m, {K: ip.PCA(rank=1), "blocks.1.attn.k.hook_out": ip.PCA(rank=1)}, t), "names the same hook"),
    Bad("fit_pca_on_pattern", lambda m, t, d: ip.fit_proxy(m, {"blocks.1.attn.hook_pattern": ip.PCA(rank=2)}, t), "use OneHotAttention there"),
    Bad("fit_pca_on_attention_scores", lambda m, t, d: ip.fit_proxy(m, {"blocks.1.attn.hook_attn_scores": ip.PCA(rank=2)}, t), "simplify hook_k or hook_q"),
    Bad("fit_onehot_off_pattern", lambda m, t, d: ip.fit_proxy(m, {K: ip.OneHotAttention()}, t), "acts on attention patterns"),
    Bad("fit_rank_above_dimension", lambda m, t, d: ip.fit_proxy(m, {K: ip.PCA(rank=9)}, t), "rank 9 exceeds the feature dimension 8"),
    Bad("fit_clusters_above_samples", lambda m, t, d: ip.fit_proxy(m, {K: ip.KMeans(n_clusters=10_000)}, t), "samples it would be fitted on"),
    Bad("fit_pca_no_features", lambda m, t, d: ip.PCA(rank=1).fit(torch.zeros(10, 0)), "activations have no features (feature dimension 0)"),
    # simplifiers and configs
    Bad("pca_rank_zero", lambda m, t, d: ip.PCA(rank=0), "rank must be a positive integer"),
    Bad("pca_rank_text", lambda m, t, d: ip.PCA(rank="2"), "rank must be a positive integer, got '2'"),
    Bad("kmeans_no_clusters", lambda m, t, d: ip.KMeans(n_clusters=0), "n_clusters must be a positive integer"),
    Bad("train_lr_text", lambda m, t, d: ip.TrainConfig(lr="fast"), "TrainConfig.lr must be a number, got 'fast'"),
    Bad("train_steps_negative", lambda m, t, d: ip.TrainConfig(max_steps=-1), "max_steps must be a positive integer"),
    Bad("train_lr_infinite", lambda m, t, d: ip.TrainConfig(lr=float("inf")), "TrainConfig.lr must be a finite number, got inf"),
    Bad("train_on_one_split", lambda m, t, d: ip.train(m, t), "train: splits must be a SplitSet or {name: Split}, got one Split"),
    Bad("train_loss_not_finite", lambda m, t, d: ip.train(_fresh_model(), ip.SplitSet([t]), ip.TrainConfig(lr=1e30, max_steps=5, warmup_steps=0, batch_size=8, progress=False)), "training diverged; lower train.lr (now 1e+30)"),
    Bad("model_width_zero", lambda m, t, d: ip.ModelConfig(d_model=0), "d_model must be a positive integer"),
    Bad("dyck_no_brackets", lambda m, t, d: ip.DyckConfig(k=0), "DyckConfig.k must be >= 1"),
    # evaluate
    Bad("evaluate_one_split", lambda m, t, d: _evaluate(m, t, splits=t), "got one Split; wrap it"),
    Bad("evaluate_no_proxies", lambda m, t, d: _evaluate(m, t, proxies={}), "needs at least one proxy"),
    Bad("evaluate_not_a_proxy", lambda m, t, d: _evaluate(m, t, proxies={"p": ip.PCA(rank=2)}), "not an ip.Proxy"),
    Bad("evaluate_ids_beyond_vocabulary", lambda m, t, d: _evaluate(m, t, splits=ip.SplitSet([t, _split(_tokens(high=90), "ood", "ood_x")])), "encode the text with this model's tokenizer"),
    Bad("evaluate_longer_than_context", lambda m, t, d: _evaluate(m, t, splits=ip.SplitSet([t, _split(_tokens(length=40), "ood", "ood_x")])), "longer than the model's context"),
    Bad("evaluate_empty_split", lambda m, t, d: _evaluate(m, t, splits=ip.SplitSet([t, Split(name="ood_x", role="ood", tokens=torch.zeros(0, 4, dtype=torch.long), eval_mask=torch.zeros(0, 4, dtype=torch.bool), targets=torch.zeros(0, 4, dtype=torch.long), real_mask=torch.zeros(0, 4, dtype=torch.bool))])), "has no scored position"),
    Bad("evaluate_mean_ablation_without_train", lambda m, t, d: _evaluate(m, t, splits=ip.SplitSet([_split(_tokens(), "ood", "ood_x")])), "there is none; add the train split or pass ablation='zero'"),
    Bad("evaluate_targets_beyond_outputs", lambda m, t, d: _evaluate(m, t, splits=ip.SplitSet([t, ip.Split.from_scored(_tokens(), torch.ones(4, 8, dtype=torch.bool), _tokens() + 100, role="ood", name="ood_x")])), "targets outside the model's output vocabulary"),
    Bad("evaluate_answer_ids_beyond_outputs", lambda m, t, d: _evaluate(m, t, answer_ids=[1, 99]), "answer_ids must lie in the model's output vocabulary"),
    Bad("evaluate_batch_size_zero", lambda m, t, d: _evaluate(m, t, batch_size=0), "batch_size must be a positive integer"),
    Bad("evaluate_n_boot_negative", lambda m, t, d: ip.evaluate(m, {"p": _pca(m, t)}, ip.SplitSet([t]), n_boot=-1), "n_boot must be a non-negative integer"),
    Bad("evaluate_chunk_negative", lambda m, t, d: _evaluate(m, t, chunk_size=-1), "chunk_size must be a positive integer or None"),
    Bad("evaluate_ablation_sequences_zero", lambda m, t, d: _evaluate(m, t, ablation_sequences=0), "ablation_sequences must be a positive integer"),
    Bad("evaluate_ablation_unknown", lambda m, t, d: _evaluate(m, t, ablation="median"), "unknown ablation 'median'"),
    Bad("evaluate_metric_unknown", lambda m, t, d: _evaluate(m, t, metrics=["agreemnt"]), "did you mean 'agreement'"),
    Bad("sweep_on_one_split", lambda m, t, d: ip.sweep(m, t, hooks=[K]), "sweep: splits must be a SplitSet or {name: Split}, got one Split"),
    Bad("collect_on_a_split_set", lambda m, t, d: next(ip.collect_activations(m, ip.SplitSet([t]), [K])), "collect_activations: split must be an ip.Split, got SplitSet"),
    Bad("evaluate_proxy_of_another_model", lambda m, t, d: _evaluate(_fresh_model(), t, proxies={"p": _pca(m, t)}), "was fit where"),
    # saved proxies
    Bad("load_missing_folder", lambda m, t, d: ip.Proxy.load(d / "nope"), "metadata.json: missing"),
    Bad("load_garbled_metadata", lambda m, t, d: (_saved_proxy(m, t, d), (d / "p" / "metadata.json").write_text("{"), ip.Proxy.load(d / "p")), "not valid JSON"),
    Bad("load_newer_format", lambda m, t, d: ip.Proxy.load(_saved_proxy(m, t, d, meta=lambda j: j.__setitem__("format_version", 99))), "unknown proxy format version 99"),
    Bad("load_unregistered_method", lambda m, t, d: ip.Proxy.load(_saved_proxy(m, t, d, meta=lambda j: j["hooks"][0]["simplifier"].__setitem__("method", "mine"))), "unknown simplifier 'mine'"),
    Bad("load_truncated_tensors", lambda m, t, d: (_saved_proxy(m, t, d), (d / "p" / "tensors.safetensors").write_bytes(b"\x10\x00\x00"), ip.Proxy.load(d / "p")), "corrupted or truncated safetensors"),
    Bad("load_tensor_wrong_shape", lambda m, t, d: ip.Proxy.load(_saved_proxy(m, t, d, edit=lambda s: _set(s, "0.components", torch.zeros(4, 8, 3)))), "tensor 'components' has shape [4, 8, 3]"),
    Bad("load_rank_disagrees_with_tensors", lambda m, t, d: ip.Proxy.load(_saved_proxy(m, t, d, meta=lambda j: j["hooks"][0]["simplifier"]["options"].__setitem__("rank", 5))), "has [4, 8, 5]"),
    Bad("load_tensor_missing", lambda m, t, d: ip.Proxy.load(_saved_proxy(m, t, d, edit=lambda s: s.pop("0.mean"))), "tensor 'mean' is missing"),
    Bad("load_tensor_not_finite", lambda m, t, d: ip.Proxy.load(_saved_proxy(m, t, d, edit=lambda s: _set(s, "0.mean", torch.full((4, 8), float("nan"))))), "holds NaN or inf"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_input_is_a_one_line_error(bad: Bad, native_bridge, random_train_split, tmp_path: Path) -> None:
    with pytest.raises(ip.IllusionProbeError) as raised:
        bad.call(native_bridge, random_train_split, tmp_path)
    message = str(raised.value)
    assert bad.message in message and "\n" not in message, message
    assert hook_count(native_bridge) == 0
