"""One self-contained HTML report (plotly.js inlined, opens offline) from saved results."""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from illusion_probe.artifacts import atomic_write_text
from illusion_probe.errors import IllusionProbeError
from illusion_probe.report.figures import accuracy_figure, category_figure, projection_figure, sweep_figure
from illusion_probe.results import Results

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.bad { color: #b00020; font-weight: 600; } .note { color: #555; font-size: 0.9rem; }
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


def featured_proxies(results: Results) -> list[str]:
    """The headline proxy of each swept family plus every size-free proxy (one-hot attention, ablations)."""
    chosen = [row["proxy"] for row in results.headline()]
    sizeless = [r.proxy for r in results.records if r.size is None]
    return list(dict.fromkeys([*chosen, *sizeless]))


def _headline_section(results: Results) -> str:
    ood = [s for s in results.splits if results.select(split=s, role="ood")]
    rows = []
    for row in results.headline():
        size = str(row["size"]) if row["reached"] else f"<span class='bad'>none reaches 99%</span> (best: {row['size']})"
        cells = [html.escape(row["method"]), html.escape(row["hooks"]), size, _fmt(row["id_agreement"])]
        cells += [_fmt(row["ood_agreement"].get(s)) for s in ood]
        rows.append(cells)
    if not rows:
        return "<p class='note'>No size sweep in these results.</p>"
    return _table(["method", "hooks", "smallest size with ≥99% test agreement", "test agreement", *ood], rows)


def _gap_section(results: Results, proxies: list[str]) -> str:
    rows = []
    for gap in results.gaps:
        if gap.proxy in proxies and gap.category == "all" and gap.metric in ("agreement", "kl", "acc_proxy"):
            excludes_zero = math.isfinite(gap.ci_low) and (gap.ci_low > 0 or gap.ci_high < 0)
            value = _fmt(gap.value)
            rows.append([html.escape(gap.proxy), gap.metric, f"{gap.id_split} − {gap.ood_split}",
                         f"<span class='bad'>{value}</span>" if excludes_zero else value,
                         f"[{_fmt(gap.ci_low)}, {_fmt(gap.ci_high)}]"])
    if not rows:
        return "<p class='note'>No in-distribution and OOD split pair to compare.</p>"
    note = "<p class='note'>Gap = ID value − OOD value; bold red where the 95% interval excludes 0.</p>"
    return note + _table(["proxy", "metric", "splits", "gap", "95% interval"], rows)


def render_report(results: Results, title: str = "illusion-probe report") -> str:
    """The report as one HTML string with plotly.js inlined."""
    from plotly.offline import get_plotlyjs

    if not results.records:
        raise IllusionProbeError("cannot write a report from an empty results set; evaluate at least one proxy")
    featured = featured_proxies(results)
    figures = [("Faithfulness against proxy size", sweep_figure(results)),
               ("Accuracy per split", accuracy_figure(results, featured))]
    if "projection" in results.extras:
        figures.append(("Keys and queries of the analysed head", projection_figure(results.extras["projection"])))
    by_category = category_figure(results, featured)
    if by_category is not None:
        figures.append(("Agreement by position category", by_category))
    sections = [f"<h2>{html.escape(name)}</h2>" + fig.to_html(full_html=False, include_plotlyjs=False,
                                                              config={"responsive": True})
                for name, fig in figures]
    provenance = json.dumps(results.meta, indent=2, sort_keys=True, default=str)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>{html.escape(title)}</h1>
<p class="note">How faithful each simplified proxy stays to the model, in distribution (test) and out of it (ood_*).
Intervals are 95% bootstrap intervals over sequences.</p>
<h2>Headline</h2>{_headline_section(results)}
{''.join(sections)}
<h2>Generalization gaps</h2>{_gap_section(results, featured)}
<h2>Provenance</h2><pre>{html.escape(provenance)}</pre>
</body></html>
"""


def write_report(results: Results, path: str | os.PathLike, title: str = "illusion-probe report") -> Path:
    """Write the self-contained HTML report to ``path`` atomically; returns the path."""
    atomic_write_text(path, render_report(results, title=title))
    return Path(path)
