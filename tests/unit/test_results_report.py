"""Results container (JSON/CSV, gaps, headline) and the self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import dataclasses
import gzip
import io
import json
import math
import re
import subprocess
import sys

import pytest

from illusion_probe.analysis.projection import Panel, Projection
from illusion_probe.errors import ArtifactError, IllusionProbeError
from illusion_probe.report.html import render_report, write_report
from illusion_probe.results import Gap, MetricInfo, Record, Results


def _results() -> Results:
    records, gaps = [], []
    for split, role in [("train", "train"), ("test", "id"), ("ood_deeper", "ood")]:
        for size in (1, 2, 4):
            agreement = {"train": 0.9, "test": 0.9, "ood_deeper": 0.5}[split] + 0.03 * size
            for metric, value in [("agreement", min(agreement, 1.0)), ("kl", 1.0 / size), ("acc_model", 0.99),
                                  ("acc_proxy", 0.9)]:
                records.append(Record(split=split, role=role, proxy=f"pca({size})@h", method="pca", size=size,
                                      category="all", metric=metric, value=value, ci_low=value - 0.01,
                                      ci_high=value + 0.01, n_positions=100, n_sequences=10, hooks="h"))
        records.append(Record(split=split, role=role, proxy="onehot@p", method="onehot_attention", size=None,
                              category="all", metric="agreement", value=0.7, ci_low=float("nan"),
                              ci_high=float("nan"), n_positions=100, n_sequences=10, hooks="p"))
        records.append(Record(split=split, role=role, proxy="onehot@p", method="onehot_attention", size=None,
                              category="all", metric="acc_model", value=0.99, ci_low=0.98, ci_high=1.0,
                              n_positions=100, n_sequences=10, hooks="p"))
        records.append(Record(split=split, role=role, proxy="onehot@p", method="onehot_attention", size=None,
                              category="all", metric="acc_proxy", value=0.6, ci_low=0.5, ci_high=0.7,
                              n_positions=100, n_sequences=10, hooks="p"))
    gaps.append(Gap(proxy="pca(4)@h", method="pca", size=4, category="all", metric="agreement", id_split="test",
                    ood_split="ood_deeper", value=0.4, ci_low=0.3, ci_high=0.5))
    metrics = [MetricInfo("agreement", "agreement with the model", True, "positions"),
               MetricInfo("kl", "KL(model ‖ proxy), nats", False, "positions")]
    return Results(records=records, gaps=gaps, metrics=metrics, meta={"seed": 0})


PROJECTION = Projection(layer=1, head=0, meta={}, panels=(
    Panel("train", "key", (0.0, 1.0), (1.0, 0.0), (1, 2)), Panel("ood_deeper", "key", (0.5,), (0.5,), (5,))))


def test_json_round_trip_is_lossless(tmp_path) -> None:
    results = _results()
    loaded = Results.from_json(results.to_json(tmp_path / "r.json"))
    assert len(loaded.records) == len(results.records) and len(loaded.gaps) == len(results.gaps)
    for a, b in [*zip(results.records, loaded.records, strict=True), *zip(results.gaps, loaded.gaps, strict=True)]:
        for field in a.__dataclass_fields__:
            x, y = getattr(a, field), getattr(b, field)
            assert (isinstance(x, float) and math.isnan(x) and math.isnan(y)) or x == y
    assert loaded.meta == results.meta and loaded.metrics == results.metrics


def test_other_schema_version_refused(tmp_path) -> None:
    path = _results().to_json(tmp_path / "r.json")
    data = json.loads(path.read_text())
    data["schema_version"] = 42
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="schema version 42") as err:
        Results.from_json(path)
    assert "\n" not in str(err.value)


def test_empty_results_refused(tmp_path) -> None:
    with pytest.raises(IllusionProbeError, match="empty"):
        Results().to_json(tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(IllusionProbeError, match="empty"):
        render_report(Results())


def test_select_equals_a_scan_of_every_record() -> None:
    results = _results()
    criteria = [{}, {"split": "test"}, {"metric": "kl", "split": "ood_deeper"}, {"size": None}, {"size": 2.0},
                {"proxy": "onehot@p", "metric": "acc_proxy", "category": "all"}, {"split": "nowhere"},
                {"value": float("nan")}, {"ci_low": float("nan")}]
    for wanted in criteria:
        scan = [r for r in results.records if all(getattr(r, k) == v for k, v in wanted.items())]
        assert results.select(**wanted) == scan, wanted
    with pytest.raises(IllusionProbeError, match="one value") as info:
        results.select(split=["test", "train"])
    assert "\n" not in str(info.value)


def test_meta_is_read_only_and_with_meta_derives_a_copy() -> None:
    results = _results()
    with pytest.raises(TypeError):
        results.meta["seed"] = 1  # type: ignore[index]
    derived = results.with_meta(seed=1, note="x")
    assert (results.meta["seed"], derived.meta["seed"], derived.meta["note"]) == (0, 1, "x")


def test_csv_has_every_record() -> None:
    rows = list(csv.DictReader(io.StringIO(_results().to_csv())))
    assert len(rows) == len(_results().records) and rows[0]["metric"] == "agreement"


def test_headline_and_gap() -> None:
    results = _results()
    (row,) = results.headline()
    assert row["method"] == "pca" and row["size"] == 4 and row["reached"]
    assert row["ood_agreement"]["ood_deeper"] == pytest.approx(0.62)
    (gap,) = results.gap("agreement", "test", "ood_deeper")
    assert gap.value == 0.4
    with pytest.raises(IllusionProbeError, match="no 'kl' gap"):
        results.gap("kl", "test", "ood_deeper")


def test_report_is_self_contained(tmp_path) -> None:
    path = write_report(_results(), tmp_path / "report.html", projection=PROJECTION)
    text = path.read_text()
    assert not re.search(r"<script[^>]*\ssrc=", text)  # plotly.js is inlined, nothing is fetched
    assert text.count("data-figure=") >= 3  # sweep, accuracy, projection: drawn once plotly.js is unpacked
    assert "pca(4)@h" in text and "Provenance" in text
    packed = re.search(r'<script type="application/octet-stream" id="plotly-js">([^<]+)</script>', text)
    assert packed is not None
    from plotly.offline import get_plotlyjs

    assert gzip.decompress(base64.b64decode(packed.group(1))).decode() == get_plotlyjs()  # all of plotly.js, once
    assert text.index("<h2>Verdict</h2>") < text.index("<h2>Headline</h2>")  # the verdict comes first


def test_report_module_does_not_import_torch() -> None:
    code = "import sys, illusion_probe.report.html, illusion_probe.results; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_fidelity_figure_places_each_proxy_at_its_mean_in_distribution_explained_variance() -> None:
    from illusion_probe.report.figures import fidelity_figure

    base = _results()
    assert fidelity_figure(base) is None  # no explained variance: nothing to match on
    extra = []
    for split, role in [("train", "train"), ("test", "id"), ("ood_deeper", "ood")]:
        for size in (1, 2, 4):
            for hook, offset in (("h.k", 0.0), ("h.q", 0.1)):  # two hooks: x is their mean
                value = 0.2 * size + offset + (0.3 if split != "test" else 0.0)
                extra.append(Record(split=split, role=role, proxy=f"pca({size})@h", method="pca", size=size,
                                    category="all", metric="explained_variance", value=value, ci_low=value,
                                    ci_high=value, n_positions=100, n_sequences=10, hooks="h", hook=hook))
    figure = fidelity_figure(Results(records=[*base.records, *extra], gaps=base.gaps, metrics=base.metrics, meta={}))
    assert figure is not None
    assert [trace.name for trace in figure.data] == ["pca @ h"] * 3  # one family, one panel per split
    for trace in figure.data:
        assert list(trace.x) == pytest.approx([0.25, 0.45, 0.85])  # test-split EV, averaged over k and q
    assert list(figure.data[2].y) == pytest.approx([0.53, 0.56, 0.62])  # agreement on ood_deeper


def test_gap_cells_are_marked_only_when_significant_after_holm() -> None:
    base = _results()
    p_values = (0.001, 0.03, 0.04)  # each below 0.05 alone; Holm over 3: 0.003, 0.06, 0.06
    gaps = [dataclasses.replace(base.gaps[0], ood_split=f"ood_{i}", p_value=p) for i, p in enumerate(p_values)]
    records = [*base.records, *(dataclasses.replace(r, split=f"ood_{i}") for i in range(len(p_values))
                                for r in base.records if r.split == "ood_deeper")]
    page = render_report(Results(records=records, gaps=gaps, metrics=base.metrics, meta={}))
    gap_table = page[page.index("<h2>Generalization gaps</h2>"):]
    assert gap_table.count("<span class='worse'>") == 1 and "Holm correction across the 3 gaps" in gap_table


def test_the_headline_chooses_on_the_validation_split_when_there_is_one() -> None:
    base = _results()
    (on_test,) = base.headline()
    assert (on_test["selected_on"], on_test["size"]) == ("test", 4)  # no val split: the choice falls back to test
    val = [dataclasses.replace(r, split="val", role="val", value=0.995 if r.metric == "agreement" else r.value)
           for r in base.records if r.split == "test"]
    (row,) = Results(records=[*base.records, *val], gaps=base.gaps, metrics=base.metrics).headline()
    assert (row["selected_on"], row["size"], row["selection_agreement"]) == ("val", 1, 0.995)  # size 1 reaches 99% there
    assert row["id_agreement"] == pytest.approx(0.93)  # and its agreement is still reported on test


def test_training_figure_draws_every_split_over_training_and_refuses_a_malformed_history() -> None:
    from illusion_probe.report.figures import training_figure

    assert training_figure(_results()) is None  # no history: no figure
    history = [{"step": 250, "loss": 1.0, "acc": {"train": 0.5, "ood_deeper": 0.4}},
               {"step": 500, "loss": 0.5, "acc": {"train": 0.9, "ood_deeper": 0.7}}]
    figure = training_figure(_results().with_meta(training_history=history))
    assert figure is not None
    assert [(t.name, list(t.x), list(t.y)) for t in figure.data] == [("train", [250, 500], [0.5, 0.9]),
                                                                   ("ood_deeper", [250, 500], [0.4, 0.7])]
    assert "Model accuracy during training" in render_report(_results().with_meta(training_history=history))
    with pytest.raises(IllusionProbeError, match="training_history") as info:
        render_report(_results().with_meta(training_history=[{"step": "late"}]))
    assert "\n" not in str(info.value)


def test_seed_agreement_counts_each_seeds_corrected_verdict_per_family() -> None:
    from illusion_probe.analysis.verdicts import seed_agreement

    base = _results()
    by_seed = {seed: dataclasses.replace(base, gaps=[dataclasses.replace(base.gaps[0], value=value, p_value=p)])
               for seed, (value, p) in enumerate([(0.4, 0.001), (0.4, 0.5), (-0.4, 0.001)])}
    (row,) = seed_agreement(by_seed)  # one featured family with a gap: pca@h (its headline proxy pca(4)@h)
    assert (row["family"], row["ood_split"], row["category"]) == ("pca@h", "ood_deeper", "all")
    assert (row["seeds"], row["worse"], row["not_significant"], row["better"]) == (3, 1, 1, 1)
    assert row["gaps"] == {0: 0.4, 1: 0.4, 2: -0.4} and row["proxies"] == {s: "pca(4)@h" for s in range(3)}
    # One marked cell per seed: the simultaneous interval is the 95% one, as a symmetric normal interval.
    gap = base.gaps[0]
    low, high = row["intervals"][0]
    assert high - low == pytest.approx(gap.ci_high - gap.ci_low) and (low + high) / 2 == pytest.approx(0.4)
    with pytest.raises(IllusionProbeError, match="at least one seed"):
        seed_agreement({})


def test_the_ablation_note_follows_the_edit_not_the_name() -> None:
    from illusion_probe.report.html import _ablation_note

    def results(proxy: str, method: str, hooks: str) -> Results:
        record = Record(split="test", role="id", proxy=proxy, method=method, size=None, category="all",
                        metric="agreement", value=0.5, ci_low=0.4, ci_high=0.6, n_positions=10, n_sequences=2,
                        hooks=hooks)
        return Results(records=[record], gaps=[], metrics=[], meta={})

    kq = "blocks.1.attn.hook_k+blocks.1.attn.hook_q"
    assert "same edit" in _ablation_note(results("baseline", "mean_ablation", kq), ["baseline"])
    assert "same edit" in _ablation_note(results("z", "zero_ablation", kq), ["z"])
    assert _ablation_note(results("mean_ablation@hook_k+hook_q", "pca", kq), ["mean_ablation@hook_k+hook_q"]) == ""
    assert _ablation_note(results("a", "mean_ablation", "blocks.1.attn.hook_k"), ["a"]) == ""
