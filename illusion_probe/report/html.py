"""One self-contained HTML report (plotly.js inlined, opens offline) from saved results.

Every metric the results describe appears in the report, with no edit here: the gap table reads
each metric's direction from the results, and the full table lists every metric.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from illusion_probe import stats
from illusion_probe.analysis.matched import gaps_at
from illusion_probe.analysis.verdicts import ALPHA, VERDICT_METRIC, direction, featured_proxies, verdict_gaps
from illusion_probe.artifacts import atomic_write_text
from illusion_probe.errors import IllusionProbeError
from illusion_probe.report.figures import (
    accuracy_figure,
    category_figure,
    fidelity_figure,
    projection_figure,
    sweep_figure,
    training_figure,
)
from illusion_probe.results import AGREEMENT_TARGET, DISAGREEMENT_RATIO, MATCHED, Gap, Results

if TYPE_CHECKING:  # the report never imports torch; a projection is plain data
    import plotly.graph_objects as go

    from illusion_probe.analysis.projection import Projection

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.worse { color: #b00020; font-weight: 600; } .better { color: #1b5e20; font-weight: 600; }
.note { color: #555; font-size: 0.9rem; } .ci { color: #666; font-size: 0.75rem; white-space: nowrap; }
.verdict { overflow-x: auto; } .verdict table { font-size: 0.82rem; } summary { cursor: pointer; font-weight: 600; margin: 1rem 0; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
"""


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict_section(results: Results, proxies: list[str]) -> str:
    """The first screen: per featured proxy and OOD split, agreement in and out of distribution, the gap, and what
    the controls say about it."""
    id_splits, ood_splits = results.splits_with_role("id"), results.splits_with_role("ood")
    if not id_splits or not ood_splits:
        return "<p class='note'>No in-distribution and OOD split pair to compare.</p>"
    reference = id_splits[0]
    gaps, adjusted = verdict_gaps(results, proxies)

    def value(split: str, proxy: str, metric: str) -> str:
        found = results.select(split=split, proxy=proxy, metric=metric, category="all")
        return f"{_fmt(found[0].value)}" if found else "–"

    rows = []
    for proxy in proxies:
        for ood in ood_splits:
            method, _, hooks = proxy.partition("@")
            label = f"<b>{html.escape(method)}</b><br><span class='ci'>{html.escape(hooks)}</span>" if hooks else html.escape(proxy)
            cells = [label, html.escape(ood), value(reference, proxy, VERDICT_METRIC),
                     value(ood, proxy, VERDICT_METRIC)]
            for category in ("all", MATCHED, "refit_ceiling", "refit_closes", "random"):
                gap = gaps.get((proxy, category, ood))
                value_cell, interval = _gap_cell(results, gap, adjusted)
                cells.append(f"{value_cell}<br><span class='ci'>{interval}</span>" if gap else "–")
            cells.append(f"{value(reference, proxy, 'acc_model')} → {value(ood, proxy, 'acc_model')}")
            rows.append(cells)
    note = (f"<p class='note'>Agreement with the model on {html.escape(reference)} and on each OOD split; gap = "
            f"{html.escape(reference)} − OOD, with its 95% interval. Difficulty-matched: the OOD split reweighted to "
            f"the {html.escape(reference)} mix of the model's confidence. Refit ceiling: the gap left when the proxy "
            "is refitted on half of the OOD split and scored on the other half; refit closes: what that refit "
            "recovers; random: the gap of the same form with random structure (docs/concepts.md). Red: less "
            f"faithful out of distribution, significant at {ALPHA:g} after a Holm correction across the "
            f"{len(adjusted)} gaps of the first three gap columns.{_ablation_note(results, proxies)}</p>")
    table = _table(["proxy", "OOD split", f"agreement {reference}", "agreement OOD", "gap", "difficulty-matched gap",
                    "refit ceiling", "refit closes", "random baseline gap", "model accuracy"], rows)
    return f"{note}<div class='verdict'>{table}</div>"


def _ablation_note(results: Results, proxies: list[str]) -> str:
    """Why one ablation of keys and queries stands for both, when the study shows one."""
    edits = {r.proxy: (r.method, {hook.rsplit(".", 1)[-1] for hook in r.hooks.split("+")}) for r in results.records}
    if not any(edits[p][0] in ("mean_ablation", "zero_ablation") and edits[p][1] == {"hook_k", "hook_q"}
               for p in proxies if p in edits):
        return ""
    return (" Ablating keys and queries to their mean or to zero is the same edit in effect (every key equal, so every "
            "query attends uniformly), so one ablation baseline is shown.")


def _headline_section(results: Results) -> str:
    """Per swept family, the proxy chosen on the selection split, its agreement in and out of distribution with
    intervals, and how many times more often it disagrees with the model out of distribution."""
    headline = results.headline()
    if not headline:
        return "<p class='note'>No size sweep in these results.</p>"
    id_splits, ood = results.splits_with_role("id"), results.splits_with_role("ood")
    reference = id_splits[0] if id_splits else "test"
    selection = headline[0]["selected_on"]
    ratios = {(g.proxy, g.ood_split): g for g in results.gaps
              if g.metric == DISAGREEMENT_RATIO and g.category == "all" and g.id_split == reference}

    def agreement(split: str, proxy: str, metric: str = "agreement") -> str:
        found = results.select(split=split, proxy=proxy, metric=metric, category="all")
        return f"{_fmt(found[0].value)}<br><span class='ci'>[{_fmt(found[0].ci_low)}, {_fmt(found[0].ci_high)}]</span>" \
            if found else "–"

    rows = []
    for row in headline:
        size = str(row["size"]) if row["reached"] else f"<span class='worse'>none reaches 99%</span> (best: {row['size']})"
        cells = [html.escape(row["method"]), html.escape(row["hooks"]), size, _fmt(row["selection_agreement"]),
                 agreement(reference, row["proxy"])]
        for split in ood:
            ratio = ratios.get((row["proxy"], split))
            times = (f"{ratio.value:.1f}x<br><span class='ci'>[{ratio.ci_low:.1f}, {ratio.ci_high:.1f}]</span>"
                     if ratio is not None and math.isfinite(ratio.value) else "–")
            cells += [agreement(split, row["proxy"]), times]
        rows.append(cells)
    model = ["model accuracy", "", "", agreement(selection, headline[0]["proxy"], "acc_model").split("<br>")[0],
             agreement(reference, headline[0]["proxy"], "acc_model")]
    rows.append(model + [cell for split in ood for cell in (agreement(split, headline[0]["proxy"], "acc_model"), "")])
    rule = (f"Each family's proxy is its smallest size whose agreement on <b>{html.escape(selection)}</b> reaches 99%"
            + (f", a split held out for choosing, so that {html.escape(reference)}, the in-distribution side of every gap, "
               "is not also the split the choice was made on" if selection != reference else
               f"; there is no validation split, so the choice is made on {html.escape(reference)}, the in-distribution "
               "side of every gap")
            + ". Beside each OOD agreement: how many times more often the proxy disagrees with the model there than on "
              f"{html.escape(reference)}, (1 − agreement OOD) / (1 − agreement {html.escape(reference)}), with its 95% "
              "interval: near 1, differences understate change (0.9995 → 0.9967 is about 7x the disagreements).")
    header = ["method", "hooks", f"smallest size with ≥99% {selection} agreement", f"agreement {selection}",
              f"agreement {reference}"] + [h for split in ood for h in (split, "× disagreements")]
    return f"<p class='note'>{rule}</p>" + _table(header, rows) + _matched_section(results, headline, reference, ood)


def _matched_section(results: Results, headline: list[dict], reference: str, ood: list[str]) -> str:
    """Each family's agreement gap at exactly the target agreement on the selection split, interpolated between its
    two sizes bracketing it: families compared at matched in-distribution fidelity."""
    selection = headline[0]["selected_on"]
    rows = []
    for row in headline:
        at = {g.ood_split: g for g in gaps_at(results, (row["method"], row["hooks"]), AGREEMENT_TARGET, "agreement",
                                                reference, "agreement", selection)}
        rows.append([html.escape(row["method"]), html.escape(row["hooks"]),
                     *(f"{_fmt(at[s].value)}<br><span class='ci'>[{_fmt(at[s].ci_low)}, {_fmt(at[s].ci_high)}]</span>"
                       if s in at else "–" for s in ood)])
    note = (f"<p class='note'>At matched fidelity: each family's agreement gap ({html.escape(reference)} − OOD) at "
            f"exactly {AGREEMENT_TARGET:.0%} agreement on {html.escape(selection)}, linear in that agreement between "
            "the family's two sizes that bracket it (interval likewise interpolated; – where no two sizes bracket it).</p>")
    return note + _table(["method", "hooks", *ood], rows)


def _gap_cell(results: Results, gap: Gap | None, adjusted: dict[int, float]) -> list[str]:
    """A gap's value (coloured when significant after correction) and its interval, as two cells."""
    if gap is None:
        return ["–", "–"]
    verdict = direction(results, gap, adjusted.get(id(gap), float("nan")))
    value = f"<span class='{verdict}'>{_fmt(gap.value)}</span>" if verdict else _fmt(gap.value)
    return [value, f"[{_fmt(gap.ci_low)}, {_fmt(gap.ci_high)}]"]


def _gap_section(results: Results, proxies: list[str]) -> str:
    matched = {(g.proxy, g.metric, g.id_split, g.ood_split): g for g in results.gaps if g.category == MATCHED}
    pairs = [(gap, matched.get((gap.proxy, gap.metric, gap.id_split, gap.ood_split))) for gap in results.gaps
             if gap.proxy in proxies and gap.category == "all" and results.metric_info(gap.metric).higher_is_better
             is not None]
    if not pairs:
        return "<p class='note'>No in-distribution and OOD split pair to compare.</p>"
    family = [g for pair in pairs for g in pair if g is not None]  # every cell this table can mark
    adjusted = dict(zip(map(id, family), stats.holm([g.p_value for g in family]), strict=True))
    rows = [[html.escape(gap.proxy), html.escape(results.metric_info(gap.metric).title), html.escape(gap.hook),
             f"{gap.id_split} − {gap.ood_split}", *_gap_cell(results, gap, adjusted), *_gap_cell(results, twin, adjusted)]
            for gap, twin in pairs]
    note = ("<p class='note'>Gap = ID value − OOD value. Red: the proxy is less faithful out of distribution (for KL, "
            "where lower is better, that is a negative gap); green: more faithful; coloured only where the gap is "
            f"significant at {ALPHA:g} after a Holm correction across the {len(family)} gaps of this table (two-sided "
            "bootstrap p-values). Difficulty-matched: the OOD split reweighted to the in-distribution mix of the "
            "model's confidence (docs/concepts.md).</p>")
    return note + _table(["proxy", "metric", "hook", "splits", "gap", "95% interval", "difficulty-matched gap",
                          "95% interval"], rows)


def _metrics_section(results: Results, proxies: list[str]) -> str:
    """Every metric of the featured proxies on every split (category ``all``), value and interval."""
    splits = results.splits
    rows = []
    for proxy in proxies:
        for metric in results.metric_names:
            hooks = dict.fromkeys(r.hook for r in results.select(proxy=proxy, metric=metric, category="all"))
            for hook in hooks:
                cells = []
                for split in splits:
                    found = results.select(proxy=proxy, metric=metric, category="all", split=split, hook=hook)
                    cells.append(f"{_fmt(found[0].value)} [{_fmt(found[0].ci_low, 3)}, {_fmt(found[0].ci_high, 3)}]"
                                 if found else "–")
                rows.append([html.escape(proxy), html.escape(results.metric_info(metric).title), html.escape(hook),
                             *cells])
    return _table(["proxy", "metric", "hook", *splits], rows)


def _category_section(results: Results, proxies: list[str], metric: str = "agreement") -> str:
    """``metric`` of the featured proxies per position category (every label, confidence bin and the
    difficulty-matched value) and split, with intervals: the breakdowns behind the heatmap figure."""
    categories = [c for c in dict.fromkeys(r.category for r in results.records) if c != "all"]
    if not categories:
        return "<p class='note'>These splits have no position categories.</p>"
    splits = results.splits
    rows = []
    for proxy in proxies:
        for category in categories:
            cells = []
            for split in splits:
                found = results.select(proxy=proxy, metric=metric, category=category, split=split)
                cells.append(f"{_fmt(found[0].value)}<br><span class='ci'>[{_fmt(found[0].ci_low, 3)}, "
                             f"{_fmt(found[0].ci_high, 3)}] n={found[0].n_positions}</span>"
                             if found and found[0].n_positions else "–")
            rows.append([html.escape(proxy), html.escape(category), *cells])
    return _table(["proxy", "category", *splits], rows)


def render_report(results: Results, title: str = "illusion-probe report", projection: Projection | None = None) -> str:
    """The report as one HTML string that opens offline: plotly.js inlined once, gzip-compressed (base64), and
    unpacked by the browser (``DecompressionStream``) before the figures are drawn from their JSON."""
    if not results.records:
        raise IllusionProbeError("cannot write a report from an empty results set; evaluate at least one proxy")
    featured = featured_proxies(results)
    figures = [("Faithfulness against proxy size", sweep_figure(results))]
    matched = fidelity_figure(results)
    if matched is not None:
        figures.append(("Faithfulness at matched in-distribution fidelity", matched))
    figures.append(("Accuracy per split", accuracy_figure(results, featured)))
    training = training_figure(results)
    if training is not None:
        figures.append(("Model accuracy during training", training))
    if projection is not None:
        figures.append(("Keys and queries of the analysed head", projection_figure(projection)))
    by_category = category_figure(results, featured)
    if by_category is not None:
        figures.append(("Agreement by position category", by_category))
    # Fixed element ids, so the same results give the same file byte for byte.
    sections = [f"<h2>{html.escape(name)}</h2>{_figure_block(f'figure-{i}', fig)}" for i, (name, fig) in enumerate(figures)]
    provenance = json.dumps(dict(results.meta), indent=2, sort_keys=True, default=str)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
<p class="note">How faithful each simplified proxy stays to the model, in distribution (test) and out of it (ood_*).
Intervals are 95% bootstrap intervals over sequences.</p>
<h2>Verdict</h2>{_verdict_section(results, featured)}
<h2>Headline</h2>{_headline_section(results)}
{''.join(sections)}
<h2>Generalization gaps</h2>{_gap_section(results, featured)}
<details><summary>Agreement by position category, with intervals</summary>{_category_section(results, featured)}</details>
<details><summary>Every metric of these proxies, per split</summary>{_metrics_section(results, featured)}</details>
<details><summary>Provenance</summary><pre>{html.escape(provenance)}</pre></details>
<script type="application/octet-stream" id="plotly-js">{_packed_plotly()}</script>
<script>{LOADER}</script>
</body></html>
"""


#: Unpacks plotly.js in the browser, then draws every figure from its JSON.
LOADER = """
(async () => {
  const packed = document.getElementById("plotly-js").textContent.trim();
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  (0, eval)(await new Response(stream).text());
  for (const node of document.querySelectorAll("script[data-figure]")) {
    const figure = JSON.parse(node.textContent);
    Plotly.newPlot(node.dataset.figure, figure.data, figure.layout, {responsive: true});
  }
})();
"""


def _figure_block(div_id: str, fig: go.Figure) -> str:
    """An empty ``div`` and the figure's JSON, drawn by :data:`LOADER` once plotly.js is unpacked."""
    payload = fig.to_json().replace("</", "<\\/")  # nothing in the JSON may close the script element
    return f'<div id="{div_id}"></div><script type="application/json" data-figure="{div_id}">{payload}</script>'


def _packed_plotly() -> str:
    """plotly.js (the version plotly.py ships), gzip-compressed with a fixed timestamp, in base64."""
    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), mtime=0)).decode()


def write_report(results: Results, path: str | os.PathLike, title: str = "illusion-probe report",
                 projection: Projection | None = None) -> Path:
    """Write the self-contained HTML report to ``path`` atomically; returns the path."""
    atomic_write_text(path, render_report(results, title=title, projection=projection))
    return Path(path)
