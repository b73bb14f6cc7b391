"""The backend adapter: one per model, by type; resumed passes skip earlier blocks and change nothing."""

from __future__ import annotations

import pytest
import torch

import illusion_probe as ip
from illusion_probe.backends import Backend, transformer_lens_major
from illusion_probe.hook_names import final_norm_in, resid_post, resid_pre
from tests.helpers import hook_count

EXPECTED_KIND = {"hooked": "hooked", "bridge": "bridge", "bridge_hf": "bridge_hf"}


def test_one_adapter_per_model_kept_on_the_model(model_family) -> None:
    adapter = Backend.of(model_family)
    assert Backend.of(model_family) is adapter
    assert adapter.kind in EXPECTED_KIND.values()
    assert adapter.d_vocab_out == model_family.cfg.d_vocab


def test_final_residual_and_head_reproduce_the_logits(model_family, random_train_split) -> None:
    backend = Backend.of(model_family)
    batch = random_train_split.head(6)
    with torch.no_grad():
        logits = model_family(batch.tokens)
        final = backend.final_residual(batch.tokens, batch.real_mask)
        real = batch.real_mask  # padding may differ: bridges mask it, plain calls do not
        assert torch.allclose(backend.head(final[real]), logits[real], atol=1e-5)
    assert hook_count(model_family) == 0


def test_resumed_pass_skips_earlier_blocks_and_matches_a_whole_pass(model_family, random_train_split) -> None:
    backend = Backend.of(model_family)
    batch = random_train_split.head(6)
    if not backend.can_resume(1):
        assert backend.kind == "bridge_hf"  # their blocks need arguments only the HF forward builds
        return
    entering: dict[str, torch.Tensor] = {}
    ran: list[int] = []
    with torch.no_grad():
        whole = backend.final_residual(batch.tokens, batch.real_mask,
                                       [(resid_pre(1), lambda a, hook: entering.setdefault("x", a))])
        handle = model_family.blocks[0].register_forward_pre_hook(lambda *_: ran.append(1))
        try:
            resumed = backend.final_residual(batch.tokens, batch.real_mask, resume=(1, entering["x"]))
        finally:
            handle.remove()
    assert not ran
    real = batch.real_mask
    assert torch.allclose(resumed[real], whole[real], atol=1e-6)


def test_feature_shapes_are_measured_once(model_family) -> None:
    backend = Backend.of(model_family)
    shapes = backend.feature_shapes(["blocks.0.hook_resid_pre", "blocks.1.attn.hook_k", "blocks.1.attn.hook_pattern"])
    d_head = model_family.cfg.d_head
    assert shapes == {"blocks.0.hook_resid_pre": (model_family.cfg.d_model,),
                      "blocks.1.attn.hook_k": (model_family.cfg.n_heads, d_head),
                      "blocks.1.attn.hook_pattern": (model_family.cfg.n_heads,)}
    calls: list[int] = []
    handle = model_family.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        assert backend.feature_shapes(["blocks.1.attn.hook_k"]) == {"blocks.1.attn.hook_k": shapes["blocks.1.attn.hook_k"]}
    finally:
        handle.remove()
    assert not calls  # cached on the adapter: no forward pass the second time


def test_fitting_at_the_last_block_never_runs_the_unembedding(model_family, random_train_split) -> None:
    """Hooks up to the final residual stop there (no full-vocabulary logits) and fit what a whole pass fits."""
    last = [resid_post(model_family.cfg.n_layers - 1)]
    hooks = last if Backend.of(model_family).kind == "hooked" else [*last, final_norm_in()]  # bridges only
    wanted = {f"{s.method}@{hook}": {hook: s} for hook in hooks for s in (ip.MeanAblation(), ip.PCA(rank=3))}
    calls: list[int] = []
    handle = model_family.unembed.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        early = ip.fit_proxies(model_family, wanted, random_train_split, batch_size=8)
        assert not calls
        whole = ip.fit_proxies(model_family, {**wanted, "late": {"ln_final.hook_normalized": ip.MeanAblation()}},
                               random_train_split, batch_size=8)  # a hook after the blocks: the whole model runs
        assert calls
    finally:
        handle.remove()
    for name, proxy in early.items():
        (hook, simplifier), = proxy.simplifiers.items()
        expected = whole[name].simplifiers[hook].state_dict()
        for key, value in simplifier.state_dict().items():
            torch.testing.assert_close(value, expected[key], msg=f"{name}: {key}")
    mean = {hook: early[f"mean_ablation@{hook}"].simplifiers[hook].state_dict()["mean"] for hook in hooks}
    assert all(torch.equal(value, mean[last[0]]) for value in mean.values())  # ln_final.hook_in: the same residual
    assert hook_count(model_family) == 0


def test_not_a_hooked_model() -> None:
    with pytest.raises(ip.IllusionProbeError, match="not a TransformerLens HookedTransformer or TransformerBridge"):
        Backend.of(torch.nn.Linear(2, 2))


def test_unreadable_transformer_lens_version(monkeypatch) -> None:
    monkeypatch.setattr("illusion_probe.backends.package_version", lambda name: "dev")
    with pytest.raises(ip.IllusionProbeError, match="cannot read the installed TransformerLens version"):
        transformer_lens_major()
