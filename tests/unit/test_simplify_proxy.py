"""Proxies on the three model families, with legacy and canonical hook names."""

from __future__ import annotations

import json

import pytest
import torch

import illusion_probe as ip
from illusion_probe.backends import Backend
from illusion_probe.models import ModelConfig, build_model
from tests.conftest import TINY_CONFIG, TINY_SIZES
from tests.helpers import hook_count

# (legacy name, canonical bridge name); HookedTransformer only knows the legacy one.
HOOKS = {
    "resid": ("blocks.0.hook_resid_post", "blocks.0.hook_out"),
    "keys": ("blocks.1.attn.hook_k", "blocks.1.attn.k.hook_out"),
}
NAME_STYLES = ("legacy", "canonical")


def _hook(model: torch.nn.Module, kind: str, style: str) -> str:
    """The hook name in ``style``; HookedTransformer refuses a bridge's canonical names, so it gets its own."""
    legacy, canonical = HOOKS[kind]
    if style == "canonical" and Backend.of(model).kind == "hooked":
        with pytest.raises(ip.IllusionProbeError, match=f"unknown hook name '{canonical}' on HookedTransformer"):
            ip.resolve_hook_name(model, canonical)
        return legacy
    return legacy if style == "legacy" else canonical


@pytest.mark.parametrize("style", NAME_STYLES)
@pytest.mark.parametrize("kind", sorted(HOOKS))
def test_full_rank_proxy_reproduces_clean_logits(model_family, random_train_split, kind: str, style: str) -> None:
    hook = _hook(model_family, kind, style)
    width = TINY_CONFIG.d_model if kind == "resid" else TINY_CONFIG.resolved_d_head
    proxy = ip.fit_proxy(model_family, {hook: ip.PCA(width)}, random_train_split)
    assert proxy.hook_names == (hook,) and proxy.simplifiers[hook].per_head == (kind == "keys")
    tokens = random_train_split.tokens[:4]
    clean = model_family(tokens)
    with proxy.applied(model_family):
        assert torch.allclose(model_family(tokens), clean, atol=1e-4)  # float32 identity control
    assert hook_count(model_family) == 0


@pytest.mark.parametrize("style", NAME_STYLES)
def test_save_load_reproduces_logits_exactly(model_family, random_train_split, tmp_path, style: str) -> None:
    resid, keys = _hook(model_family, "resid", style), _hook(model_family, "keys", style)
    proxy = ip.fit_proxy(model_family, {resid: ip.PCA(5), keys: ip.KMeans(3)}, random_train_split, n_sequences=16)
    proxy.save(tmp_path / "proxy")
    loaded = ip.Proxy.load(tmp_path / "proxy")
    tokens = random_train_split.tokens[:5]
    with proxy.applied(model_family):
        before = model_family(tokens)
    with loaded.applied(model_family):
        after = model_family(tokens)
    assert torch.equal(before, after) and not torch.allclose(before, model_family(tokens))
    assert loaded.name == proxy.name and loaded.hook_names == (resid, keys)
    meta = json.loads((tmp_path / "proxy" / "metadata.json").read_text())
    assert (meta["kind"], meta["format_version"], meta["backend"]) == ("proxy", 1, Backend.of(model_family).kind)
    assert meta["fit"] == {"split": "train", "role": "train", "n_sequences": 16,
                           "n_tokens": int(random_train_split.real_mask[:16].sum())}
    assert meta["provenance"]["versions"]["transformer_lens"]


def test_fit_proxy_fits_copies_and_matches_direct_fit(native_bridge, random_train_split) -> None:
    template = ip.PCA(4)
    proxy = ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": template}, random_train_split)
    assert not template.is_fitted and proxy.simplifiers["blocks.0.hook_resid_post"] is not template
    _, cache = native_bridge.run_with_cache(random_train_split.tokens, names_filter=["blocks.0.hook_resid_post"])
    direct = ip.PCA(4).fit(cache["blocks.0.hook_resid_post"], mask=random_train_split.real_mask)
    x = cache["blocks.0.hook_resid_post"]
    assert torch.allclose(proxy.simplifiers["blocks.0.hook_resid_post"](x), direct(x), atol=1e-5)


def test_collect_activations_streams_real_positions_keyed_by_user_names(model_family, random_train_split) -> None:
    names = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_q"]
    batches = list(ip.collect_activations(model_family, random_train_split, names, n_sequences=20, batch_size=8))
    assert len(batches) == 3 and all(set(b) == set(names) for b in batches)
    n_real = int(random_train_split.real_mask[:20].sum())
    assert sum(b[names[0]].shape[0] for b in batches) == n_real
    assert batches[0][names[1]].shape[1:] == (TINY_CONFIG.n_heads, TINY_CONFIG.resolved_d_head)
    first = torch.zeros_like(random_train_split.real_mask)
    first[:, 0] = True
    only_first = list(ip.collect_activations(model_family, random_train_split, names[:1], positions=first))
    assert sum(b[names[0]].shape[0] for b in only_first) == len(random_train_split)


def test_on_apply_sees_hook_input_and_output(native_bridge, random_train_split) -> None:
    proxy = ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.PCA(3)}, random_train_split)
    seen = []
    with proxy.applied(native_bridge, on_apply=lambda name, a, b: seen.append((name, a, b))):
        native_bridge(random_train_split.tokens[:2])
    ((name, act_in, act_out),) = seen
    assert name == "blocks.0.hook_resid_post" and act_in.shape == act_out.shape == (2, 12, TINY_CONFIG.d_model)
    assert torch.equal(act_out, proxy.simplifiers[name](act_in))


def test_no_hooks_left_when_forward_raises(model_family, random_train_split) -> None:
    proxy = ip.fit_proxy(model_family, {"blocks.0.hook_resid_post": ip.MeanAblation()}, random_train_split)
    with pytest.raises(RuntimeError, match="boom"), proxy.applied(model_family):
        assert hook_count(model_family) >= 1
        raise RuntimeError("boom")
    assert hook_count(model_family) == 0
    mismatched = ip.Proxy({"blocks.0.hook_resid_post": ip.PCA(2).fit(torch.randn(20, 5))})  # no recorded shapes
    with pytest.raises(ip.IllusionProbeError, match=r"fitted on \(1, 5\)"), mismatched.applied(model_family):
        model_family(random_train_split.tokens[:1])  # the hook itself raises mid-forward
    assert hook_count(model_family) == 0


def test_proxy_refuses_model_with_other_hook_shapes(native_bridge, random_train_split) -> None:
    proxy = ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.PCA(4)}, random_train_split)
    wider = build_model(TINY_SIZES, ModelConfig(n_layers=2, d_model=48, n_heads=4, seed=1), backend="bridge")
    with pytest.raises(ip.IllusionProbeError, match=r"has shape \[32\].*this model has \[48\]") as err, \
            proxy.applied(wider):
        pass
    assert "\n" not in str(err.value) and hook_count(wider) == 0


def test_fit_proxy_validates_before_any_forward(native_bridge, random_train_split) -> None:
    calls = []
    handle = native_bridge.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ip.IllusionProbeError, match=r"did you mean 'blocks\.0\.hook_resid_post'"):
            ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_pots": ip.PCA(2)}, random_train_split)
        ood = ip.Split.from_tokens(random_train_split.tokens, "ood", name="ood_x")
        with pytest.raises(ip.IllusionProbeError, match="would hide the very gap"):
            ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.PCA(2)}, ood)
        with pytest.raises(ip.IllusionProbeError, match="per_head=True needs a per-head hook"):
            ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.PCA(2, per_head=True)}, random_train_split)
        with pytest.raises(ip.IllusionProbeError, match="use OneHotAttention there"):
            ip.fit_proxy(native_bridge, {"blocks.0.attn.hook_pattern": ip.PCA(2)}, random_train_split)
        with pytest.raises(ip.IllusionProbeError, match="names the same hook"):
            ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.PCA(2), "blocks.0.hook_out": ip.PCA(3)},
                         random_train_split)
    finally:
        handle.remove()
    assert calls == []
    ok = ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.PCA(2)}, ood, allow_non_train=True)
    assert ok.fit_info["role"] == "ood"


def test_rank_beyond_dimension_and_too_many_clusters(native_bridge, random_train_split) -> None:
    batches = []  # the only forward pass allowed is the one-sequence shape probe, never the split's data
    handle = native_bridge.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        with pytest.raises(ip.IllusionProbeError, match="rank 33 exceeds the feature dimension 32"):
            ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.PCA(33)}, random_train_split)
        with pytest.raises(ip.IllusionProbeError, match="rank 9 exceeds the feature dimension 8"):
            ip.fit_proxy(native_bridge, {"blocks.0.attn.hook_k": ip.PCA(9)}, random_train_split)
    finally:
        handle.remove()
    assert set(batches) <= {1}
    with pytest.raises(ip.IllusionProbeError, match="exceeds the 10 samples it would be fitted on"):
        tiny = ip.Split.from_tokens(random_train_split.tokens[:1, :10].clamp_min(1), "train", name="train")
        ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.KMeans(11)}, tiny)


def test_unknown_proxy_format_version(native_bridge, random_train_split, tmp_path) -> None:
    ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.PCA(2)}, random_train_split).save(tmp_path / "p")
    meta_file = tmp_path / "p" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ip.ArtifactError, match="unknown proxy format version 99") as err:
        ip.Proxy.load(tmp_path / "p")
    assert "\n" not in str(err.value)


def test_same_edit_compares_methods_options_and_fitted_tensors(native_bridge, random_train_split, tmp_path) -> None:
    k, q = "blocks.1.attn.hook_k", "blocks.1.attn.hook_q"
    mean = ip.fit_proxy(native_bridge, {k: ip.MeanAblation(), q: ip.MeanAblation()}, random_train_split)
    reordered = ip.fit_proxy(native_bridge, {q: ip.MeanAblation(), k: ip.MeanAblation()}, random_train_split)
    assert mean.same_edit(reordered) and reordered.same_edit(mean)
    mean.save(tmp_path / "mean")
    assert mean.same_edit(ip.Proxy.load(tmp_path / "mean"))
    fewer = ip.fit_proxy(native_bridge, {k: ip.MeanAblation(), q: ip.MeanAblation()}, random_train_split, n_sequences=5)
    zero = ip.fit_proxy(native_bridge, {k: ip.ZeroAblation(), q: ip.ZeroAblation()}, random_train_split)
    one_hook = ip.fit_proxy(native_bridge, {k: ip.MeanAblation()}, random_train_split)
    pooled = ip.fit_proxy(native_bridge, {k: ip.MeanAblation(per_head=False), q: ip.MeanAblation()}, random_train_split)
    for other in (fewer, zero, one_hook, pooled):
        assert not mean.same_edit(other)
    with pytest.raises(ip.IllusionProbeError, match="compares two proxies"):
        mean.same_edit(ip.MeanAblation())
