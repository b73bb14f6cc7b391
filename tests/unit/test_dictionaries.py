"""Transcoders, external dictionaries, the error-term control and the dictionary metrics.

A transcoder learns a sparse map from an MLP's input to its output, sweeps and round-trips like
every simplifier, and reads the MLP input when applied; an external SAE (any module with encode and
decode) is applied, saved and rebuilt; every proxy family with its error term added back gives the
clean logits exactly; the dictionary metrics equal their definitions computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import illusion_probe as ip
from illusion_probe.metrics import L0, DeadFraction, FrequencyShift, OODOnlyLatents
from illusion_probe.sweeps import sweep_simplifiers

MLP_OUT, MLP_IN = "blocks.0.hook_mlp_out", "blocks.0.ln2.hook_normalized"


def _explained_variance(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return float(1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_a_transcoder_learns_a_sparse_map_from_input_to_output() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=generator)
    atoms = torch.randn(16, 8, generator=generator)
    outputs = torch.randn(16, 6, generator=generator)
    y = torch.relu(x @ atoms.T - 2.0) @ outputs  # a sparse, nonlinear map: about 4 of 16 atoms per sample
    transcoder = ip.Transcoder(32, k=8, epochs=40, lr=3e-3).fit(y, inputs=x)
    y_hat = transcoder.replace(x, y)
    assert y_hat.shape == y.shape
    assert _explained_variance(y, y_hat) > 0.85
    affine = torch.cat([x, torch.ones(len(x), 1)], 1)
    best_linear = affine @ torch.linalg.lstsq(affine, y).solution
    assert _explained_variance(y, y_hat) > _explained_variance(y, best_linear) + 0.3


def test_a_transcoder_sweep_reads_the_mlp_input_shares_one_sample_and_round_trips(model_family, random_train_split,
                                                                                 tmp_path) -> None:
    wanted = sweep_simplifiers([MLP_OUT], "transcoder", (8, 16), k=4, epochs=2)
    together = ip.fit_proxies(model_family, wanted, random_train_split)
    for name, simplifiers in wanted.items():
        assert together[name].same_edit(ip.fit_proxy(model_family, simplifiers, random_train_split, name=name))
    proxy = together[f"transcoder(16)@{MLP_OUT}"]
    assert proxy.read_hooks == (MLP_OUT, MLP_IN)
    tokens = random_train_split.tokens[:4]
    _, cache = model_family.run_with_cache(tokens, names_filter=[MLP_IN, MLP_OUT])
    transcoder = proxy.simplifiers[MLP_OUT]
    seen = {}
    with proxy.applied(model_family, on_apply=lambda hook, act, out: seen.update(out=out)):
        proxied = model_family(tokens)
    assert torch.allclose(seen["out"], transcoder.replace(cache[MLP_IN], cache[MLP_OUT]), atol=1e-6)
    proxy.save(tmp_path / "transcoder")
    loaded = ip.Proxy.load(tmp_path / "transcoder")
    assert loaded.same_edit(proxy)
    with loaded.applied(model_family):
        assert torch.equal(model_family(tokens), proxied)


FAMILIES = {
    "pca": ("blocks.1.hook_resid_pre", lambda: ip.PCA(3)),
    "kmeans": ("blocks.0.attn.hook_k", lambda: ip.KMeans(4)),
    "sae": ("blocks.1.hook_resid_pre", lambda: ip.SAE(16, k=2, epochs=1)),
    "transcoder": (MLP_OUT, lambda: ip.Transcoder(16, k=2, epochs=1)),
    "onehot": ("blocks.0.attn.hook_pattern", lambda: ip.OneHotAttention()),
    "mean": ("blocks.1.hook_resid_pre", lambda: ip.MeanAblation()),
    "zero": ("blocks.0.hook_mlp_out", lambda: ip.ZeroAblation()),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_with_its_error_term_every_proxy_gives_the_clean_logits_exactly(family: str, editable_model,
                                                                        random_train_split) -> None:
    hook, make = FAMILIES[family]
    proxy = ip.fit_proxy(editable_model, {hook: make()}, random_train_split)
    control = proxy.with_error_term()
    tokens = random_train_split.tokens
    clean = editable_model(tokens)
    with proxy.applied(editable_model):
        assert not torch.equal(editable_model(tokens), clean)  # the proxy itself does change the output
    with control.applied(editable_model):
        assert torch.equal(editable_model(tokens), clean)
    assert control.error_term and not control.same_edit(proxy)


def test_the_error_term_survives_save_and_load_and_scores_perfect_agreement(native_bridge, random_train_split,
                                                                           tmp_path) -> None:
    control = ip.fit_proxy(native_bridge, {"blocks.1.hook_resid_pre": ip.PCA(2)}, random_train_split).with_error_term()
    control.save(tmp_path / "control")
    loaded = ip.Proxy.load(tmp_path / "control")
    assert loaded.error_term and loaded.same_edit(control)
    results = ip.evaluate(native_bridge, {"control": loaded}, {"train": random_train_split}, n_boot=10,
                          metrics=["agreement", "kl"], progress=False)
    values = {r.metric: r.value for r in results.records if r.category == "all"}
    assert values == {"agreement": 1.0, "kl": 0.0}


def _terms(metric, latents: torch.Tensor, frequency: torch.Tensor | None, real: torch.Tensor) -> dict:
    return {k: v.numpy() for k, v in metric.terms(latents, frequency, real).items()}


def _reduce(metric, terms: dict) -> float:
    return float(metric.reduce({k: v.sum(0) for k, v in terms.items()}))


def test_dictionary_metrics_equal_their_definitions() -> None:
    generator = torch.Generator().manual_seed(0)
    latents = torch.relu(torch.randn(3, 5, 1, 6, generator=generator))  # [batch, pos, group, d_sae]
    latents[..., 5] = 0  # latent 5 never fires
    real = torch.ones(3, 5, dtype=torch.bool)
    real[2, 3:] = False
    frequency = torch.tensor([[0.5, 0.2, 0.0, 0.1, 0.2, 0.0]])  # latent 2 never fired on the fit sample
    active = latents[real] > 0  # [tokens, 1, d_sae]
    assert _reduce(L0(), _terms(L0(), latents, frequency, real)) == pytest.approx(float(active.sum(-1).double().mean()))
    counts = active.sum((0, 1)).double().numpy()
    assert _reduce(DeadFraction(), _terms(DeadFraction(), latents, frequency, real)) == pytest.approx(1 / 6)
    p, q = counts / counts.sum(), frequency[0].double().numpy() / float(frequency.sum())
    shift = _reduce(FrequencyShift(), _terms(FrequencyShift(), latents, frequency, real))
    assert shift == pytest.approx(0.5 * np.abs(p - q).sum())
    expected_only = int(((counts > 0) & (frequency[0].numpy() == 0)).sum())
    assert expected_only == 1  # latent 2: fires here, never in training
    assert _reduce(OODOnlyLatents(), _terms(OODOnlyLatents(), latents, frequency, real)) == expected_only
    assert OODOnlyLatents().terms(latents, None, real) == {}  # no fit-sample rates: not applicable


def test_dictionary_metrics_on_the_fit_split_show_no_shift_and_are_reported_only_for_dictionaries(
        native_bridge, random_train_split) -> None:
    proxies = ip.fit_proxies(native_bridge, {"sae": {"blocks.1.hook_resid_pre": ip.SAE(16, k=3, epochs=2)},
                                             "pca": {"blocks.1.hook_resid_pre": ip.PCA(3)}}, random_train_split)
    results = ip.evaluate(native_bridge, proxies, {"train": random_train_split}, n_boot=10, progress=False)
    values = {(r.proxy, r.metric): r.value for r in results.records}
    assert values[("sae", "l0")] == pytest.approx(3.0)  # TopK with positive pre-activations: exactly k
    assert values[("sae", "frequency_shift")] < 1e-6 and values[("sae", "ood_only_latents")] == 0
    assert 0 <= values[("sae", "dead_fraction")] < 1
    assert not [metric for proxy, metric in values if proxy == "pca" and metric in ("l0", "frequency_shift")]


class _Dictionary(torch.nn.Module):
    """A module with encode/decode, as a user's own dictionary would be."""

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.encoder = torch.nn.Linear(d_in, d_sae)
        self.decoder = torch.nn.Linear(d_sae, d_in)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def test_an_external_module_is_applied_saved_and_rebuilt(native_bridge, random_train_split, tmp_path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = _Dictionary(32, 64)
    hook = "blocks.1.hook_resid_pre"
    proxy = ip.fit_proxy(native_bridge, {hook: ip.ExternalSAE(module, config={"d_in": 32, "d_sae": 64})},
                         random_train_split)
    tokens = random_train_split.tokens[:4]
    with native_bridge.hooks(fwd_hooks=[(hook, lambda act, hook: module.decode(module.encode(act)))]):
        expected = native_bridge(tokens)
    with proxy.applied(native_bridge):
        assert torch.equal(native_bridge(tokens), expected)
    proxy.save(tmp_path / "external")
    loaded = ip.Proxy.load(tmp_path / "external")
    assert loaded.same_edit(proxy)
    with loaded.applied(native_bridge):
        assert torch.equal(native_bridge(tokens), expected)
    results = ip.evaluate(native_bridge, {"external": proxy}, {"train": random_train_split}, n_boot=10,
                          metrics=["l0", "frequency_shift"], progress=False)
    assert [r.metric for r in results.records] == ["l0"]  # no fit-sample rates: no frequency shift


@pytest.mark.parametrize(("make", "hook", "message"), [
    (lambda: ip.Transcoder(8), "blocks.0.hook_resid_post", "replaces an MLP's output"),
    (lambda: ip.Transcoder(8, input_hook="blocks.0.hook_nonexistent"), MLP_OUT, "this model has no"),
    (lambda: ip.ExternalSAE(_Dictionary(16, 8)), "blocks.1.hook_resid_pre", "encode/decode fail"),
    (lambda: ip.ExternalSAE(object()), "blocks.1.hook_resid_pre", "has no encode"),
    (lambda: ip.Transcoder(8, per_head=True), MLP_OUT, "per_head must be False"),
    (lambda: ip.Transcoder(8, k=9), MLP_OUT, "k=9 exceeds d_sae=8"),
])
def test_bad_dictionaries_are_one_line_errors_before_any_work(make, hook: str, message: str, native_bridge,
                                                             random_train_split) -> None:
    with pytest.raises(ip.IllusionProbeError, match=message) as caught:
        ip.fit_proxy(native_bridge, {hook: make()}, random_train_split)
    assert "\n" not in str(caught.value)


def test_a_transcoder_on_a_model_without_mlps_is_refused(random_train_split) -> None:
    model = ip.build_model(ip.ModelSizes(d_vocab=50, n_ctx=32), ip.ModelConfig(n_layers=1, d_model=16, n_heads=2,
                                                                                attn_only=True))
    with pytest.raises(ip.IllusionProbeError, match="a block without an MLP"):
        ip.fit_proxy(model, {MLP_OUT: ip.Transcoder(8)}, random_train_split)


def test_a_transcoder_is_not_a_hook_on_its_own_and_needs_its_inputs_to_fit() -> None:
    with pytest.raises(ip.IllusionProbeError, match="fitting needs the MLP inputs"):
        ip.Transcoder(8).partial_fit(torch.randn(10, 4))
    fitted = ip.Transcoder(8, k=2, epochs=1).partial_fit(torch.randn(10, 4), inputs=torch.randn(10, 4)).finalize()
    with pytest.raises(ip.IllusionProbeError, match="apply it through a proxy"):
        fitted(torch.randn(10, 4))


def test_unsaved_external_objects_say_why(native_bridge, random_train_split, tmp_path) -> None:
    class Plain:
        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x)

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return z

    proxy = ip.fit_proxy(native_bridge, {"blocks.1.hook_resid_pre": ip.ExternalSAE(Plain())}, random_train_split)
    with pytest.raises(ip.IllusionProbeError, match="only a torch.nn.Module can be saved"):
        proxy.save(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()

