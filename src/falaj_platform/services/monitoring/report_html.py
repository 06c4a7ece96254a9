"""The drift report as one self-contained HTML page: a summary, a table of every column's
test, and a reference-vs-current plot of each column as inline SVG (no scripts, no
external files, so it opens anywhere and can be archived as is).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2

from falaj_platform.services.monitoring.drift import ColumnDrift, ColumnKind, Histogram

PLOT_WIDTH = 520
PLOT_HEIGHT = 200
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 48, 12, 26, 48
REFERENCE_COLOR = "#4c78a8"
CURRENT_COLOR = "#f58518"


@dataclass(frozen=True)
class ReportPage:
    """What the page shows besides the columns."""

    title: str
    model_version: str
    reference_profile: str
    window_start: dt.datetime | None
    window_end: dt.datetime | None
    row_count: int
    drift_share: float
    drift_share_threshold: float
    dataset_drift: bool
    drifted_count: int
    tested_count: int
    created: dt.datetime | None
    feature_drifts: Sequence[ColumnDrift]
    prediction_drifts: Sequence[ColumnDrift]


def _number(value: float) -> str:
    if math.isnan(value):
        return "–"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def _shares(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def _axes(max_share: float) -> list[str]:
    inner_height = PLOT_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    x0, y0 = MARGIN_LEFT, PLOT_HEIGHT - MARGIN_BOTTOM
    parts = [
        f'<line x1="{x0}" y1="{MARGIN_TOP}" x2="{x0}" y2="{y0}" stroke="#333"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{PLOT_WIDTH - MARGIN_RIGHT}" y2="{y0}" stroke="#333"/>',
    ]
    for tick in (0.0, 0.5, 1.0):
        y = y0 - tick * inner_height
        parts.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick * max_share:.0%}</text>')
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{PLOT_WIDTH - MARGIN_RIGHT}" y2="{y:.1f}" stroke="#eee"/>')
    return parts


def _legend() -> list[str]:
    # Above the plot area, so that it never hides a bar.
    x, y = PLOT_WIDTH - MARGIN_RIGHT - 150, 4
    return [
        f'<rect x="{x}" y="{y}" width="10" height="10" fill="{REFERENCE_COLOR}"/>',
        f'<text x="{x + 14}" y="{y + 9}" font-size="10">reference</text>',
        f'<rect x="{x + 80}" y="{y}" width="10" height="10" fill="{CURRENT_COLOR}"/>',
        f'<text x="{x + 94}" y="{y + 9}" font-size="10">current</text>',
    ]


def _bars(labels: Sequence[str], reference: Sequence[float], current: Sequence[float], numeric_axis: bool) -> str:
    inner_width = PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    inner_height = PLOT_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    y0 = PLOT_HEIGHT - MARGIN_BOTTOM
    max_share = max([*reference, *current, 1e-12])
    slot = inner_width / max(1, len(labels))
    parts = _axes(max_share)
    for index, (label, ref, cur) in enumerate(zip(labels, reference, current, strict=True)):
        x = MARGIN_LEFT + index * slot
        for offset, share, color in ((0.1, ref, REFERENCE_COLOR), (0.5, cur, CURRENT_COLOR)):
            height = share / max_share * inner_height
            parts.append(
                f'<rect x="{x + offset * slot:.1f}" y="{y0 - height:.1f}" width="{0.4 * slot:.1f}" height="{height:.1f}" fill="{color}">'
                f"<title>{jinja2.utils.markupsafe.escape(label)}: {share:.2%}</title></rect>"
            )
        every = max(1, math.ceil(len(labels) / 7))
        if index % every == 0 or not numeric_axis:
            text = jinja2.utils.markupsafe.escape(label[:14])
            cx = x + slot / 2
            if numeric_axis:
                parts.append(f'<text x="{cx:.1f}" y="{y0 + 12}" font-size="9" text-anchor="middle">{text}</text>')
            else:
                parts.append(
                    f'<text x="{cx:.1f}" y="{y0 + 10}" font-size="9" text-anchor="end" transform="rotate(-35 {cx:.1f} {y0 + 10})">{text}</text>'
                )
    parts.extend(_legend())
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" '
        f'viewBox="0 0 {PLOT_WIDTH} {PLOT_HEIGHT}" role="img">' + "".join(parts) + "</svg>"
    )


def histogram_svg(reference: Histogram, current: Histogram) -> str:
    """Reference and current shares per bin, side by side; bins labelled by their left edge."""
    labels = [_number(edge) for edge in reference.bin_edges[:-1]]
    return _bars(labels, _shares(reference.counts), _shares(current.counts), numeric_axis=True)


def categories_svg(reference: Sequence[tuple[str, int]], current: Sequence[tuple[str, int]]) -> str:
    labels = [name for name, _ in reference]
    current_counts = dict(current)
    return _bars(labels, _shares([c for _, c in reference]), _shares([current_counts.get(n, 0) for n in labels]), numeric_axis=False)


def column_plot(column: ColumnDrift) -> str:
    if column.kind is ColumnKind.NUMERICAL and column.reference_histogram and column.current_histogram:
        return histogram_svg(column.reference_histogram, column.current_histogram)
    if column.reference_categories:
        return categories_svg(column.reference_categories, column.current_categories)
    return '<p class="muted">No values to plot.</p>'


_TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ page.title }}</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} .muted{color:#777}
.summary{display:flex;gap:16px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:140px}
.card b{display:block;font-size:20px}
.drift{color:#b3261e} .ok{color:#1b7f3b}
table{border-collapse:collapse;font-size:13px} th,td{border-bottom:1px solid #eee;padding:4px 10px;text-align:left}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:14px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px} figcaption{font-size:13px;margin-bottom:4px}
</style></head><body>
<h1>{{ page.title }}</h1>
<div class="muted">Model version {{ page.model_version }} · reference {{ page.reference_profile }}
{% if page.window_start %} · window {{ page.window_start.isoformat() }} – {{ page.window_end.isoformat() }}{% endif %}
{% if page.created %} · computed {{ page.created.isoformat() }}{% endif %}</div>
<div class="summary">
<div class="card">Dataset drift<b class="{{ 'drift' if page.dataset_drift else 'ok' }}">{{ 'DETECTED' if page.dataset_drift else 'not detected' }}</b></div>
<div class="card">Drifted features<b>{{ page.drifted_count }} / {{ page.tested_count }}</b></div>
<div class="card">Drift share<b>{{ '%.2f'|format(page.drift_share) }}</b><span class="muted">threshold {{ '%.2f'|format(page.drift_share_threshold) }}</span></div>
<div class="card">Rows in window<b>{{ page.row_count }}</b></div>
</div>
{% for title, columns in sections %}{% if columns %}
<h2>{{ title }}</h2>
<table><tr><th>Column</th><th>Type</th><th>Method</th><th>Statistic</th><th>p-value</th><th>Threshold</th><th>Drift</th><th>Current rows</th><th>Missing</th></tr>
{% for c in columns %}<tr><td>{{ c.column }}</td><td>{{ c.kind.value|lower }}</td><td>{{ c.method.value|lower|replace('_', ' ') }}</td>
<td>{{ number(c.statistic) }}</td><td>{{ number(c.p_value) if c.p_value is not none else '' }}</td><td>{{ number(c.threshold) }}</td>
<td class="{{ 'drift' if c.drifted else 'ok' }}">{{ 'drift' if c.drifted else ('no drift' if c.tested else 'not tested') }}</td>
<td>{{ c.current_count }}</td><td>{{ c.current_missing_count }}</td></tr>{% endfor %}
</table>
<div class="plots">{% for c in columns %}<figure><figcaption><b>{{ c.column }}</b> — reference vs current
<span class="{{ 'drift' if c.drifted else 'ok' }}">({{ 'drift' if c.drifted else 'no drift' }})</span></figcaption>{{ plot(c)|safe }}</figure>{% endfor %}</div>
{% endif %}{% endfor %}
</body></html>
"""
)


def render(page: ReportPage) -> str:
    return _TEMPLATE.render(
        page=page,
        sections=(("Feature drift", list(page.feature_drifts)), ("Prediction drift", list(page.prediction_drifts))),
        number=_number,
        plot=column_plot,
    )
