"""One-hot attention: effective where pattern edits take effect, a loud error where they are ignored."""

from __future__ import annotations

import pytest
import torch

import illusion_probe as ip
from illusion_probe.backends import Backend
from illusion_probe.provenance import package_version
from tests.helpers import hook_count

PATTERN = "blocks.1.attn.hook_pattern"


def _edits_change_logits(model: torch.nn.Module, tokens: torch.Tensor) -> bool:
    """The test's own probe, independent of the library's: does a uniform pattern change the logits?"""
    uniform = model.run_with_hooks(tokens, fwd_hooks=[(PATTERN, lambda p, hook: torch.full_like(p, 1 / p.shape[-1]))])
    return not torch.allclose(uniform, model(tokens))


def test_onehot_attention_takes_effect_or_fails_loudly(model_family, random_train_split) -> None:
    tokens = random_train_split.tokens[:3]
    if _edits_change_logits(model_family, tokens):
        proxy = ip.fit_proxy(model_family, {PATTERN: ip.OneHotAttention()}, random_train_split)
        seen: dict[str, torch.Tensor] = {}
        capture = [(name, lambda a, hook, _n=name: seen.__setitem__(_n, a)) for name in
                   ("blocks.1.attn.hook_v", "blocks.1.attn.hook_z")]
        with proxy.applied(model_family):
            model_family.run_with_hooks(tokens, fwd_hooks=capture)
        _, cache = model_family.run_with_cache(tokens, names_filter=[PATTERN])
        hard = torch.nn.functional.one_hot(cache[PATTERN].argmax(-1), tokens.shape[1]).to(seen["blocks.1.attn.hook_v"])
        expected_z = torch.einsum("bhqk,bkhd->bqhd", hard, seen["blocks.1.attn.hook_v"])
        assert torch.allclose(seen["blocks.1.attn.hook_z"], expected_z, atol=1e-5)
    else:
        with pytest.raises(ip.IllusionProbeError) as err:
            ip.fit_proxy(model_family, {PATTERN: ip.OneHotAttention()}, random_train_split)
        message = str(err.value)
        assert "silently ignored" in message and Backend.of(model_family).kind in message
        assert str(package_version("transformer-lens")) in message and "\n" not in message
        with pytest.raises(ip.IllusionProbeError, match="silently ignored"), \
                ip.Proxy({PATTERN: ip.OneHotAttention()}).applied(model_family):
            pass
    assert hook_count(model_family) == 0


def test_onehot_hardens_only_chosen_heads() -> None:
    pattern = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    out = ip.OneHotAttention(heads=[1, 3])(pattern)
    assert torch.equal(out[:, [0, 2]], pattern[:, [0, 2]])
    assert torch.equal(out[:, [1, 3]].sum(-1), torch.ones(2, 2, 5))
    assert torch.equal(out[:, 1].argmax(-1), pattern[:, 1].argmax(-1))
    assert ip.OneHotAttention().describe() == "onehot_attention()" and ip.OneHotAttention().size is None


def test_onehot_refuses_other_hooks_and_bad_heads(native_bridge, random_train_split) -> None:
    with pytest.raises(ip.IllusionProbeError, match="acts on attention patterns"):
        ip.fit_proxy(native_bridge, {"blocks.0.hook_resid_post": ip.OneHotAttention()}, random_train_split)
    with pytest.raises(ip.IllusionProbeError, match="head index out of range"):
        ip.OneHotAttention(heads=[7])(torch.rand(1, 4, 3, 3))
