"""Plotly figures from :class:`~illusion_probe.results.Results`: return figures, never show or write them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from illusion_probe.analysis.matched import family_fidelity
from illusion_probe.errors import IllusionProbeError
from illusion_probe.results import Record, Results

if TYPE_CHECKING:  # the report never imports torch; a projection is plain data
    from illusion_probe.analysis.projection import Projection

PALETTE = qualitative.Plotly


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _error_bars(records: Sequence[Record]) -> dict[str, Any]:
    plus = [r.ci_high - r.value if _finite(r.ci_high) else 0.0 for r in records]
    minus = [r.value - r.ci_low if _finite(r.ci_low) else 0.0 for r in records]
    return {"type": "data", "array": plus, "arrayminus": minus, "visible": True, "thickness": 1}


def _split_colours(results: Results) -> dict[str, str]:
    return {split: PALETTE[i % len(PALETTE)] for i, split in enumerate(results.splits)}


def sweep_groups(results: Results) -> list[tuple[str, str]]:
    """``(method, hooks)`` families that were swept over more than one size."""
    sizes: dict[tuple[str, str], set[int]] = {}
    for r in results.records:
        if r.size is not None:
            sizes.setdefault((r.method, r.hooks), set()).add(r.size)
    return [group for group, found in sizes.items() if len(found) > 1]


def _group_title(results: Results, method: str, hooks: str) -> str:
    """``method<br>hooks``, with the hooks as the proxy names abbreviate them (after the ``@``)."""
    proxy = next(r.proxy for r in results.records if (r.method, r.hooks) == (method, hooks))
    return f"{method}<br>{proxy.split('@', 1)[1] if '@' in proxy else hooks}"


def sweep_figure(results: Results, metrics: Sequence[str] = ("agreement", "kl"), category: str = "all") -> go.Figure:
    """The central "illusion" figure: each metric against rank / cluster count, one line per split.

    One column per swept ``(method, hooks)`` family, one row per metric, 95% bootstrap error bars.
    """
    groups = sweep_groups(results)
    colours = _split_colours(results)
    fig = make_subplots(
        rows=len(metrics), cols=max(len(groups), 1), shared_xaxes=False, vertical_spacing=0.12,
        horizontal_spacing=0.06, column_titles=[_group_title(results, m, h) for m, h in groups] or ["no sweep"],
    )
    for col, (method, hooks) in enumerate(groups, start=1):
        for row, metric in enumerate(metrics, start=1):
            for split in results.splits:
                recs = sorted((r for r in results.select(metric=metric, split=split, method=method, category=category)
                               if r.hooks == hooks and r.size is not None), key=lambda r: r.size)
                if not recs:
                    continue
                fig.add_trace(go.Scatter(
                    x=[r.size for r in recs], y=[r.value for r in recs], error_y=_error_bars(recs),
                    mode="lines+markers", name=split, legendgroup=split, showlegend=(row == 1 and col == 1),
                    line={"color": colours[split], "dash": "solid" if recs[0].role != "ood" else "dash"},
                    hovertemplate=f"{split}<br>size %{{x}}<br>{metric} %{{y:.4f}}<extra></extra>",
                ), row=row, col=col)
            sizes = sorted({r.size for r in results.records if (r.method, r.hooks) == (method, hooks) and r.size})
            size_name = results.meta.get("size_options", {}).get(method, "size")
            fig.update_xaxes(type="log", tickvals=sizes, title_text=size_name if row == len(metrics) else None,
                             row=row, col=col)
            fig.update_yaxes(title_text=results.metric_info(metric).title if col == 1 else None, row=row, col=col)
    fig.update_layout(height=330 * len(metrics), title="Faithfulness against proxy size (dashed: OOD splits)",
                      legend_title_text="split", template="plotly_white")
    return fig


def fidelity_figure(results: Results, metric: str = "agreement") -> go.Figure | None:
    """``metric`` on each split against explained variance in distribution, one line per swept family.

    A proxy's x is its explained variance on the first in-distribution (``id``) split, averaged over
    its hooks; proxies at the same x are equally faithful in distribution, so the families' curves
    compare their out-of-distribution fidelity at matched in-distribution fidelity. ``None`` when no
    swept family has an explained variance (or there is no ``id`` split).
    """
    in_distribution = results.splits_with_role("id")
    if not in_distribution:
        return None
    reference = in_distribution[0]
    fidelity = {group: found for group in sweep_groups(results)
                if len(found := family_fidelity(results, *group, id_split=reference)) > 1}
    if not fidelity:
        return None
    fig = make_subplots(rows=1, cols=len(results.splits), column_titles=list(results.splits), shared_yaxes=True,
                        horizontal_spacing=0.02)
    for i, (group, x_of) in enumerate(fidelity.items()):
        label = _group_title(results, *group).replace("<br>", " @ ")
        for col, split in enumerate(results.splits, start=1):
            recs = sorted((r for r in results.select(metric=metric, split=split, category="all") if r.proxy in x_of),
                          key=lambda r: x_of[r.proxy])
            fig.add_trace(go.Scatter(
                x=[x_of[r.proxy] for r in recs], y=[r.value for r in recs], error_y=_error_bars(recs),
                mode="lines+markers", name=label, legendgroup=label, showlegend=(col == 1),
                line={"color": PALETTE[i % len(PALETTE)]}, text=[r.proxy for r in recs],
                hovertemplate=f"%{{text}}<br>EV on {reference} %{{x:.3f}}<br>{metric} on {split} %{{y:.4f}}<extra></extra>",
            ), row=1, col=col)
        fig.update_xaxes(title_text=f"explained variance on {reference}", row=1, col=1)
    fig.update_yaxes(title_text=results.metric_info(metric).title, row=1, col=1)
    fig.update_layout(height=420, template="plotly_white", legend_title_text="family",
                      title=f"{results.metric_info(metric).title} per split against explained variance on {reference}: "
                            "families compared at matched in-distribution fidelity")
    return fig


def accuracy_figure(results: Results, proxies: Sequence[str]) -> go.Figure:
    """Model accuracy and the accuracy of chosen proxies on every split (bars with 95% intervals)."""
    fig = go.Figure()
    splits = results.splits

    def bars(metric: str, proxy: str) -> list[Record]:
        return [r for s in splits for r in results.select(metric=metric, split=s, proxy=proxy, category="all")]

    model = bars("acc_model", proxies[0]) if proxies else []
    if model:
        fig.add_trace(go.Bar(x=[r.split for r in model], y=[r.value for r in model], error_y=_error_bars(model),
                             name="model", marker_color="#222222"))
    for i, proxy in enumerate(proxies):
        recs = bars("acc_proxy", proxy)
        fig.add_trace(go.Bar(x=[r.split for r in recs], y=[r.value for r in recs], error_y=_error_bars(recs),
                             name=proxy, marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(barmode="group", title="Task accuracy of the model and of each proxy, per split",
                      yaxis_title="accuracy", template="plotly_white", height=420)
    return fig


def category_figure(results: Results, proxies: Sequence[str], metric: str = "agreement") -> go.Figure | None:
    """Heatmaps of ``metric`` by split x position category, one panel per proxy; ``None`` without categories."""
    categories = list(dict.fromkeys(r.category for r in results.records))
    if len(categories) < 2 or not proxies:
        return None
    fig = make_subplots(rows=1, cols=len(proxies), subplot_titles=list(proxies), horizontal_spacing=0.08)
    for col, proxy in enumerate(proxies, start=1):
        z = [[_cell(results, s, proxy, metric, c) for c in categories] for s in results.splits]
        fig.add_trace(go.Heatmap(z=z, x=categories, y=results.splits, zmin=0, zmax=1, colorscale="Viridis",
                                 showscale=(col == len(proxies)), texttemplate="%{z:.3f}",
                                 hovertemplate="%{y} / %{x}: %{z:.4f}<extra></extra>"), row=1, col=col)
    fig.update_layout(title=f"{results.metric_info(metric).title} by split and position category",
                      template="plotly_white", height=140 + 45 * len(results.splits))
    return fig


def _cell(results: Results, split: str, proxy: str, metric: str, category: str) -> float | None:
    found = results.select(split=split, proxy=proxy, metric=metric, category=category)
    return found[0].value if found and _finite(found[0].value) else None


def training_figure(results: Results) -> go.Figure | None:
    """Accuracy of the model on every split over training (``meta["training_history"]``, as
    :func:`illusion_probe.train` returns it), so an early-stopped model and a long-trained one can be told
    apart; ``None`` when the results carry no history."""
    history = results.meta.get("training_history")
    if history is None:
        return None
    if not (isinstance(history, list) and all(isinstance(r, dict) and isinstance(r.get("step"), int)
                                              and isinstance(r.get("acc"), dict) for r in history)):
        raise IllusionProbeError("results meta 'training_history' should be a list of {step, acc} records, as "
                                 "ip.train returns them; remove it or rerun the study")
    order = {split: i for i, split in enumerate(results.splits)}  # the history's own key order is not kept by JSON
    splits = sorted({name for r in history for name in r["acc"]}, key=lambda s: (order.get(s, len(order)), s))
    fig = go.Figure()
    for i, split in enumerate(splits):
        points = [(r["step"], r["acc"][split]) for r in history if split in r["acc"]]
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                 name=split, line={"color": PALETTE[i % len(PALETTE)]}))
    fig.update_layout(xaxis_title="optimiser step", yaxis_title="model accuracy", height=380,
                      margin={"t": 30, "b": 40})
    return fig


def projection_figure(projection: Projection) -> go.Figure:
    """Keys and queries of one head on their top two principal components, coloured by depth."""
    panels = projection.panels
    splits = list(dict.fromkeys(p.split for p in panels))
    kinds = list(dict.fromkeys(p.kind for p in panels))
    fig = make_subplots(rows=len(kinds), cols=len(splits), column_titles=splits, row_titles=kinds,
                        shared_xaxes=True, shared_yaxes=True, horizontal_spacing=0.03, vertical_spacing=0.06)
    depth_max = max((max(p.depth) for p in panels if p.depth), default=1)
    for panel in panels:
        fig.add_trace(go.Scattergl(
            x=list(panel.x), y=list(panel.y), mode="markers", showlegend=False,
            marker={"size": 4, "color": list(panel.depth), "colorscale": "Turbo", "cmin": 0, "cmax": depth_max,
                    "showscale": panel is panels[0], "colorbar": {"title": "depth"}, "opacity": 0.7},
            hovertemplate="depth %{marker.color}<extra></extra>",
        ), row=kinds.index(panel.kind) + 1, col=splits.index(panel.split) + 1)
    fig.update_xaxes(title_text="PC1", row=len(kinds))
    fig.update_yaxes(title_text="PC2", col=1)
    fig.update_layout(title=projection.title, template="plotly_white", height=300 * len(kinds) + 80)
    return fig
