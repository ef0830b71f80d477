"""Charts as SVG, drawn here in Python: the page needs no chart library, nothing from outside the
package, and what the browser shows is exactly what the server rendered from one query's result.

Every renderer takes the query's column names and rows (JSON values as the SQL endpoint sends them:
numbers, strings, lists, objects, null) and returns an HTML fragment. Text from the data is escaped
before it enters the markup. Beside each chart, a collapsed table holds the rows it was drawn from
(`data_table`), formatted by `shown`, so that people can read exact figures and the browser test can
compare them with the query run directly."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

Row = Sequence[Any]

PALETTE = ("#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#ea580c",
           "#475569")
WIDTH = 640                  # every SVG's viewBox width; CSS scales it to the panel
PLOT = (56, 12, 10, 26)      # margins of a plot: left (y labels), right, top, bottom (x labels)
BAR_LABEL_WIDTH = 190        # left of horizontal bars
ROW_HEIGHT = 24
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}")


# ---- text ------------------------------------------------------------------------------------------


def shown(value: Any, column: str = "") -> str:
    """A value as a person reads it, the same everywhere on the dashboard: thousands separated,
    two decimals, rates (a column named `*_rate`) as percentages, times to the second."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value * 100:.1f}%" if column.endswith("_rate") else f"{value:,.2f}"
    if isinstance(value, list):
        return ", ".join(shown(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key} {shown(item)}" for key, item in value.items())
    text = str(value)
    return text[:19] if _TIME.match(text) else text


def _short(value: float) -> str:
    """An axis label: 1.2k, 3.4M."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[:length - 1] + "…"


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _svg(height: float, body: str, label: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {WIDTH} {height:.0f}" role="img" aria-label="{escape(label)}" '
            f'xmlns="http://www.w3.org/2000/svg">{body}</svg>')


def _text(x: float, y: float, text: Any, css: str = "label", anchor: str = "start") -> str:
    """A line of text in a chart, escaped."""
    return f'<text class="{css}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{escape(str(text))}</text>'


def _rect(x: float, y: float, width: float, height: float, color: str, title: str = "", opacity: float = 1.0) -> str:
    tooltip = f"<title>{escape(title)}</title>" if title else ""
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" fill="{color}" '
            f'fill-opacity="{opacity:.2f}">{tooltip}</rect>')


def _legend(entries: Sequence[tuple[str, str]]) -> str:
    """(name, text after it) per colour, in palette order."""
    items = "".join(f'<li><i style="background:{_color(n)}"></i>{escape(name)} <b>{escape(text)}</b></li>'
                    for n, (name, text) in enumerate(entries))
    return f'<ul class="legend">{items}</ul>'


def _empty() -> str:
    return '<p class="empty">No data yet.</p>'


def customer_link(key: str) -> str:
    return f'<a href="/customers/{quote(key, safe="")}">{escape(key)}</a>'


# ---- tables ----------------------------------------------------------------------------------------


def data_table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """The rows as a table; a customer key links to the customer's page."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c, v)}</td>" for c, v in zip(columns, row)) + "</tr>" for row in rows)
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(column: str, value: Any) -> str:
    if column == "customer_key" and value:
        return customer_link(str(value))
    return escape(shown(value, column))


def table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    return data_table(columns, rows) if rows else '<p class="empty">None.</p>'


def record(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """One row, one line per column."""
    if not rows:
        return '<p class="empty">No such customer (yet).</p>'
    lines = "".join(f"<tr><th>{escape(c)}</th><td>{escape(shown(v, c))}</td></tr>" for c, v in zip(columns, rows[0]))
    return f'<table class="data record">{lines}</table>'


def kpis(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """Each column of the one row as a big number."""
    if not rows:
        return _empty()
    tiles = "".join(f'<div class="kpi"><span class="kpi-value">{escape(shown(v, c))}</span>'
                    f'<span class="kpi-name">{escape(c)}</span></div>' for c, v in zip(columns, rows[0]))
    return f'<div class="kpis">{tiles}</div>'


# ---- lines over time -------------------------------------------------------------------------------


def _instant(text: str) -> float:
    return datetime.fromisoformat(str(text)[:19]).replace(tzinfo=UTC).timestamp()


def lines(columns: Sequence[str], rows: Sequence[Row], series: Sequence[str] = (), step: bool = False) -> str:
    """Column 0 is the time; each of `series` (default: every other column) a line."""
    names = list(series) or list(columns[1:])
    at = {name: columns.index(name) for name in names}
    return _line_chart({name: [(row[0], row[at[name]]) for row in rows] for name in names}, step)


def lines_by(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """Rows of (time, series name, value): one line per name."""
    by_name: dict[str, list[tuple[Any, Any]]] = {}
    for when, name, value in rows:
        by_name.setdefault(str(name), []).append((when, value))
    return _line_chart(by_name, step=False)


def _line_chart(series: dict[str, list[tuple[Any, Any]]], step: bool) -> str:
    points = [(when, value) for values in series.values() for when, value in values if value is not None]
    if not points:
        return _empty()
    left, right, top, bottom = PLOT
    height, plot_height = 230, 230 - top - bottom
    times = [_instant(when) for when, _ in points]
    first, last = min(times), max(times)
    low, high = min(0.0, *(float(v) for _, v in points)), _nice(max(float(v) for _, v in points))

    def x(instant: float) -> float:
        return left + (WIDTH - left - right) * ((instant - first) / (last - first) if last > first else 0.5)

    def y(value: float) -> float:
        return top + plot_height * (1 - (float(value) - low) / (high - low))

    body = [_y_axis(low, high, y), _x_labels(_day(first), _day(last), height)]
    for n, values in enumerate(series.values()):
        line = [(x(_instant(when)), y(value)) for when, value in values if value is not None]
        body.append(_polyline(_steps(line) if step else line, _color(n)))
    legend = _legend([(name, shown(values[-1][1]) if values else "") for name, values in series.items()])
    return _svg(height, "".join(body), ", ".join(series)) + legend


def _nice(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above `value` (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


def _y_axis(low: float, high: float, y: Callable[[float], float]) -> str:
    left, right = PLOT[0], WIDTH - PLOT[1]
    marks = []
    for n in range(5):
        at = y(low + (high - low) * n / 4)
        marks.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{at:.1f}" y2="{at:.1f}"/>'
                     + _text(left - 6, at + 4, _short(low + (high - low) * n / 4), "axis", "end"))
    return "".join(marks)


def _x_labels(first: str, last: str, height: float, left: float = PLOT[0]) -> str:
    return _text(left, height - 8, first, "axis") + _text(WIDTH - PLOT[1], height - 8, last, "axis", "end")


def _steps(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A balance holds until its next change: across at the old value, then up or down."""
    stepped = points[:1]
    for (px, py), (_, before) in zip(points[1:], points):
        stepped += [(px, before), (px, py)]
    return stepped


def _polyline(points: list[tuple[float, float]], color: str) -> str:
    if len(points) == 1:
        (px, py), = points
        return f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>'
    path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>'


# ---- bars ------------------------------------------------------------------------------------------


def bars(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """The last column is the value; the others, joined, the label."""
    if not rows:
        return _empty()
    top = max(float(row[-1]) for row in rows) or 1.0
    span = WIDTH - BAR_LABEL_WIDTH - 90
    body = []
    for n, row in enumerate(rows):
        label, value, y = " · ".join(str(v) for v in row[:-1]), row[-1], 4 + n * ROW_HEIGHT
        width = max(1.0, span * float(value) / top)
        body.append('<g class="bar">' + _text(BAR_LABEL_WIDTH - 8, y + 15, _cut(label, 30), anchor="end")
                    + _rect(BAR_LABEL_WIDTH, y + 3, width, ROW_HEIGHT - 6, _color(0), f"{label}: {shown(value)}")
                    + _text(BAR_LABEL_WIDTH + width + 6, y + 15, shown(value), "value") + "</g>")
    return _svg(8 + len(rows) * ROW_HEIGHT, "".join(body), columns[-1])


def stacked_bars(columns: Sequence[str], rows: Sequence[Row], total: str, parts: Sequence[str],
                 note: str | None = None) -> str:
    """Per row (labelled by column 0): a bar of `total`, split into `parts`; `note`, a rate, after it."""
    if not rows:
        return _empty()
    at = {name: columns.index(name) for name in (total, *parts, *([note] if note else []))}
    top = max(float(row[at[total]]) for row in rows) or 1.0
    span = WIDTH - BAR_LABEL_WIDTH - (190 if note else 70)
    body = []
    for n, row in enumerate(rows):
        y, x = 4 + n * ROW_HEIGHT, float(BAR_LABEL_WIDTH)
        body.append(_text(BAR_LABEL_WIDTH - 8, y + 15, _cut(str(row[0]), 30), anchor="end"))
        for k, part in enumerate(parts):
            width = span * float(row[at[part]]) / top
            body.append(_rect(x, y + 3, width, ROW_HEIGHT - 6, _color(k), f"{part}: {shown(row[at[part]])}"))
            x += width
        text = shown(row[at[total]]) + (f" · {note.replace('_', ' ')} {shown(row[at[note]], note)}" if note else "")
        body.append(_text(x + 6, y + 15, text, "value"))
    legend = _legend([(part.replace("_", " "), "") for part in parts])
    return _svg(8 + len(rows) * ROW_HEIGHT, "".join(body), total) + legend


# ---- grids -----------------------------------------------------------------------------------------


def grid(columns: Sequence[str], rows: Sequence[Row], value: str | None = None, rows_order: Sequence[Any] = (),
         columns_order: Sequence[Any] = (), row_title: str = "", column_title: str = "") -> str:
    """A heat map: column 0 names the grid row, column 1 the grid column, `value` (default the last
    column) the shade and the text of the cell. With both orders fixed every cell is drawn, and one
    without a row holds 0; otherwise a cell without a row is blank (not observed)."""
    if not rows and not rows_order:
        return _empty()
    at = columns.index(value) if value else len(columns) - 1
    cells = {(row[0], row[1]): row for row in rows}
    absent = "0" if rows_order and columns_order else ""
    grid_rows = list(rows_order) or list(dict.fromkeys(row[0] for row in rows))
    grid_columns = list(columns_order) or sorted({row[1] for row in rows})
    top = max((float(row[at]) for row in rows), default=0.0) or 1.0
    left, head = 110, 34
    size = min(64.0, (WIDTH - left) / max(1, len(grid_columns)))
    body = [_text(left, 12, f"{column_title} →", "axis"), _text(4, 12, f"{row_title} ↓", "axis")]
    body += [_text(left + (k + 0.5) * size, head - 6, c, "axis", "middle") for k, c in enumerate(grid_columns)]
    for n, r in enumerate(grid_rows):
        y = head + n * size
        body.append(_text(left - 8, y + size / 2 + 4, r, "axis", "end"))
        for k, c in enumerate(grid_columns):
            body.append(_grid_cell(columns, cells.get((r, c)), at, (left + k * size, y, size), top, (r, c), absent))
    return _svg(head + len(grid_rows) * size + 4, "".join(body), f"{row_title} by {column_title}")


def _grid_cell(columns: Sequence[str], row: Row | None, at: int, box: tuple[float, float, float], top: float,
               key: tuple[Any, Any], absent: str) -> str:
    x, y, size = box
    share = (float(row[at]) if row else 0.0) / top
    title = ", ".join(f"{c} {shown(v, c)}" for c, v in zip(columns, row)) if row else "none"
    return (f'<g class="cell" data-row="{escape(str(key[0]))}" data-column="{escape(str(key[1]))}">'
            + _rect(x + 1, y + 1, size - 2, size - 2, _color(0), title, 0.06 + 0.84 * share)
            + _text(x + size / 2, y + size / 2 + 4, shown(row[at], columns[at]) if row else absent,
                    "value dark" if share > 0.55 else "value", "middle") + "</g>")


# ---- one customer over time ------------------------------------------------------------------------


def lanes(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """Rows of (time, dimension, from, to, ...) in order: per dimension a lane of bands, each segment
    from its entry to the next change of that dimension; the segments in force now reach a little past
    the latest change. A tag's exit (to = '') leaves a gap."""
    if not rows:
        return _empty()
    by_lane: dict[str, list[tuple[float, str]]] = {}
    for when, dimension, _, segment, *_ in rows:
        by_lane.setdefault(str(dimension), []).append((_instant(when), str(segment)))
    first = min(t for changes in by_lane.values() for t, _ in changes)
    latest = max(t for changes in by_lane.values() for t, _ in changes)
    last = max(latest, first + 86400) + (latest - first) * 0.05
    left, span = 130, WIDTH - 130 - 8
    colors: dict[str, str] = {}

    def x(instant: float) -> float:
        return left + span * (instant - first) / (last - first)

    body = []
    for n, (lane, changes) in enumerate(sorted(by_lane.items(), key=lambda item: _lane_order(item[0]))):
        y = 4 + n * ROW_HEIGHT
        body.append(_text(left - 8, y + 15, _cut(lane, 22), anchor="end"))
        for (start, segment), end in zip(changes, [t for t, _ in changes[1:]] + [last]):
            if segment:
                body.append(_band(x(start), x(end), y, segment, colors.setdefault(segment, _color(len(colors)))))
    height = 8 + len(by_lane) * ROW_HEIGHT + 18
    return _svg(height, "".join(body) + _x_labels(_day(first), _day(latest), height, left), "segments")


def _lane_order(lane: str) -> tuple[int, str]:
    fixed = ("lifecycle", "value_tier", "rfm")
    return (fixed.index(lane), "") if lane in fixed else (len(fixed), lane)


def _band(x1: float, x2: float, y: float, segment: str, color: str) -> str:
    width = max(2.0, x2 - x1)
    label = _text(x1 + 4, y + 15, _cut(segment, int(width / 7)), "value dark") if width > 40 else ""
    return f'<g class="band">{_rect(x1, y + 3, width, ROW_HEIGHT - 6, color, segment, 0.75)}{label}</g>'


def _day(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%d")


def timeline(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """Rows of (time, type, ...): a dot per event, one lane per type."""
    if not rows:
        return _empty()
    types = sorted({str(row[1]) for row in rows})
    times = [_instant(row[0]) for row in rows]
    first, last = min(times), max(times)
    last = last if last > first else first + 86400
    left, span = 170, WIDTH - 170 - 12
    body = []
    for n, kind in enumerate(types):
        y = 4 + (n + 0.5) * ROW_HEIGHT
        body.append(_text(left - 8, y + 4, _cut(kind, 24), anchor="end")
                    + f'<line class="grid" x1="{left}" x2="{left + span}" y1="{y}" y2="{y}"/>')
    for row, when in zip(rows, times):
        lane = types.index(str(row[1]))
        body.append(f'<circle cx="{left + span * (when - first) / (last - first):.1f}" '
                    f'cy="{4 + (lane + 0.5) * ROW_HEIGHT}" r="4" fill="{_color(lane)}">'
                    f'<title>{escape(shown(row[0]))} {escape(str(row[1]))}</title></circle>')
    height = 8 + len(types) * ROW_HEIGHT + 18
    return _svg(height, "".join(body) + _x_labels(_day(first), _day(last), height, left), "events")


RENDERERS: dict[str, Callable[..., str]] = {
    "lines": lines, "lines_by": lines_by, "bars": bars, "stacked_bars": stacked_bars, "grid": grid, "kpis": kpis,
    "table": table, "record": record, "lanes": lanes, "timeline": timeline,
}
TABLES = frozenset({"table", "record"})  # their figure is the table itself


def render(chart: str, options: dict[str, Any], columns: Sequence[str], rows: Sequence[Row]) -> str:
    """The figure, and the rows it was drawn from in a collapsed table."""
    figure = RENDERERS[chart](columns, rows, **options)
    if chart in TABLES:
        return figure
    return (f'{figure}<details class="figures"><summary>Data ({len(rows)} rows)</summary>'
            f'{data_table(columns, rows)}</details>')
