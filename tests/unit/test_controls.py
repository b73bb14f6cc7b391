"""The refit ceiling and the random baseline: known answers on synthetic cases, the decomposition's identity,
control records kept apart, and one-line errors."""

from __future__ import annotations

import dataclasses

import pytest

import illusion_probe as ip

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def controlled(editable_model, random_train_split) -> tuple[ip.Results, dict[str, ip.Proxy]]:
    splits = {"train": random_train_split,
              "test": dataclasses.replace(random_train_split.head(12), name="test", role="id"),
              "ood": dataclasses.replace(random_train_split.select(slice(12, 24)), name="ood", role="ood")}
    proxies = ip.fit_proxies(editable_model, {"pca_full": {HOOK: ip.PCA(32)}, "pca_2": {HOOK: ip.PCA(2)},
                                             "onehot": {"blocks.0.attn.hook_pattern": ip.OneHotAttention()},
                                             "kmeans": {HOOK: ip.KMeans(3)}}, random_train_split)
    results = ip.evaluate(editable_model, proxies, splits, n_boot=30, metrics=["agreement", "kl"], progress=False,
                          controls=["pca_full", "pca_2", "onehot", "kmeans"])
    return results, proxies


def _gap(results: ip.Results, proxy: str, category: str, metric: str = "agreement") -> ip.results.Gap:
    (gap,) = [g for g in results.gaps if (g.proxy, g.category, g.metric) == (proxy, category, metric)]
    return gap


def test_refitting_a_data_free_or_full_rank_proxy_recovers_nothing(controlled) -> None:
    results, _ = controlled
    assert _gap(results, "onehot", "refit_closes").value == 0.0  # the same edit, refitted or not
    assert _gap(results, "onehot", "refit_ceiling").value == _gap(results, "onehot", "heldout").value
    assert _gap(results, "pca_full", "refit_closes").value == 0.0  # full rank: the identity, whatever the data


def test_a_full_rank_random_subspace_is_the_model(controlled) -> None:
    results, _ = controlled
    random = [r for r in results.control_records if r.proxy == "pca_full | random" and r.metric == "agreement"
              and r.category == "all"]
    assert {r.split for r in random} == {"train", "test", "ood"} and all(r.value == 1.0 for r in random)
    assert _gap(results, "pca_full", "random").value == 0.0
    assert not [g for g in results.gaps if g.proxy == "onehot" and g.category == "random"]  # one-hot has none


def test_the_gap_on_the_held_out_half_is_the_ceiling_plus_what_refitting_closes(controlled) -> None:
    results, _ = controlled
    for proxy in ("pca_2", "kmeans"):
        for metric in ("agreement", "kl"):
            parts = {c: _gap(results, proxy, c, metric).value for c in ("heldout", "refit_ceiling", "refit_closes")}
            assert parts["heldout"] == pytest.approx(parts["refit_ceiling"] + parts["refit_closes"], abs=1e-12)


def test_control_records_stay_apart_from_the_proxies_own(controlled) -> None:
    results, proxies = controlled
    assert set(results.splits) == {"train", "test", "ood"} and set(results.proxies) == set(proxies)
    control_splits = {r.split for r in results.control_records}
    assert "ood:heldout" in control_splits
    refit = [r for r in results.control_records if r.proxy == "pca_2 | refit on ood"]
    assert {r.split for r in refit} == {"ood:heldout"}
    assert {g.category for g in results.gaps} >= {"all", "heldout", "refit_ceiling", "refit_closes", "random"}


def test_loaded_results_keep_the_controls(controlled, tmp_path) -> None:
    results, _ = controlled
    loaded = ip.Results.from_json(results.to_json(tmp_path / "r.json"))
    assert len(loaded.control_records) == len(results.control_records) and len(loaded.gaps) == len(results.gaps)


@pytest.mark.parametrize(("controls", "splits_roles", "message"), [
    (["nope"], ("id", "ood"), "controls names ['nope'], which are not among the proxies"),
    (["pca"], ("id", "id"), "give splits with roles 'id' and 'ood'"),
    ("pca", ("id", "ood"), "controls must be a list of proxy names"),
])
def test_bad_controls_are_one_line_errors(native_bridge, random_train_split, controls, splits_roles, message) -> None:
    proxy = ip.fit_proxy(native_bridge, {HOOK: ip.PCA(2)}, random_train_split)
    splits = {"train": random_train_split,
              **{f"s{i}": dataclasses.replace(random_train_split, name=f"s{i}", role=role)
                 for i, role in enumerate(splits_roles)}}
    with pytest.raises(ip.IllusionProbeError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        ip.evaluate(native_bridge, {"pca": proxy}, splits, n_boot=5, controls=controls, progress=False)
    assert "\n" not in str(caught.value)
