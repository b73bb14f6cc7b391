"""A SAELens SAE, wrapped by ip.ExternalSAE, gives what SAELens's own forward gives, and round-trips.

sae-lens is an optional extra (``illusion-probe[saelens]``) that pins TransformerLens below 4, so CI
installs it in the TransformerLens 3.x environment only; elsewhere these tests skip, saying so.
"""

from __future__ import annotations

import pytest
import torch

import illusion_probe as ip

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens (the [saelens] extra) is installed in the "
                               "TransformerLens 3.x CI environment only")

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def topk_sae() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=32, d_sae=64, k=4))
        for parameter in sae.parameters():  # SAELens starts b_dec at zero: move it so it matters
            parameter.data += 0.1 * torch.randn_like(parameter)
    return sae


def test_the_wrapped_sae_matches_saelens_forward_in_the_model(hooked_transformer, random_train_split,
                                                              topk_sae, tmp_path) -> None:
    proxy = ip.fit_proxy(hooked_transformer, {HOOK: ip.ExternalSAE(topk_sae)}, random_train_split)
    tokens = random_train_split.tokens
    expected = hooked_transformer.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: topk_sae(act))])
    with proxy.applied(hooked_transformer):
        assert torch.equal(hooked_transformer(tokens), expected)
    proxy.save(tmp_path / "saelens")
    loaded = ip.Proxy.load(tmp_path / "saelens")
    assert type(loaded.simplifiers[HOOK].sae) is type(topk_sae) and loaded.same_edit(proxy)
    with loaded.applied(hooked_transformer):
        assert torch.equal(hooked_transformer(tokens), expected)


def test_our_error_term_is_exact_where_saelens_is_close(hooked_transformer, random_train_split, topk_sae) -> None:
    proxy = ip.fit_proxy(hooked_transformer, {HOOK: ip.ExternalSAE(topk_sae)}, random_train_split)
    tokens = random_train_split.tokens
    clean = hooked_transformer(tokens)
    with proxy.with_error_term().applied(hooked_transformer):
        assert torch.equal(hooked_transformer(tokens), clean)
    with pytest.warns(DeprecationWarning):  # SAELens prefers HookedSAETransformer.add_sae; the forward is the same
        topk_sae.use_error_term = True
    try:
        theirs = hooked_transformer.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: topk_sae(act))])
    finally:
        topk_sae.use_error_term = False
    assert torch.allclose(theirs, clean, atol=1e-5)


def test_dictionary_metrics_read_the_saelens_latents(hooked_transformer, random_train_split, topk_sae) -> None:
    proxy = ip.fit_proxy(hooked_transformer, {HOOK: ip.ExternalSAE(topk_sae)}, random_train_split)
    results = ip.evaluate(hooked_transformer, {"saelens": proxy}, {"train": random_train_split}, n_boot=10,
                          metrics=["l0", "dead_fraction"], progress=False)
    _, cache = hooked_transformer.run_with_cache(random_train_split.tokens, names_filter=[HOOK])
    codes = topk_sae.encode(cache[HOOK][random_train_split.real_mask])
    values = {r.metric: r.value for r in results.records}
    assert values["l0"] == pytest.approx(float((codes > 0).sum(-1).double().mean()))
    assert values["dead_fraction"] == pytest.approx(float(((codes > 0).sum(0) == 0).double().mean()))
