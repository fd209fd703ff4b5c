"""Reports people look at: `simulate` and `diff` as charts.

`--format html` writes one self-contained page (plotly.js inlined, nothing fetched when it
opens) with each budget's spend over time against its limit, the spend and the speed mix
per hour, the latency saved, and the decisions by rule; a diff draws old against new.
`--format markdown` gains one chart GitHub renders, a mermaid `xychart-beta` of the spend
per hour.

The figures come from the replay itself: a `Timeline` watches every outcome, and a
`RecordingLedger` (the replay's MemoryLedger, which also keeps what each settle recorded)
gives every budget scope's spend exactly as the engine counted it. plotly is an optional
extra (`pip install 'policy-engine[report]'`); only the HTML needs it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .catalog import Catalog, load_catalog, to_usd
from .compile import CompiledPolicy
from .errors import PolicyEngineError
from .ledger import Charge, MemoryLedger
from .simulate import DiffReport, Outcome, Replayer, Report, _changes, _pct, _signed, _signed_s, diff

__all__ = ["RecordingLedger", "ReportError", "Timeline", "diff_markdown", "mermaid_chart", "render_diff",
           "render_simulate", "replay_diff", "replay_simulate", "require_plotly", "run_diff", "run_simulate",
           "simulate_markdown"]

MAX_KEYS = 8
"""Keys drawn per budget (those that came closest to the limit); the page says how many more there are."""
MAX_POINTS = 3000
"""Points per budget line; longer lines are thinned to the last value of each time step."""
MAX_BARS = 48
"""Columns of the markdown chart: hours are merged into longer steps past this."""
SPEEDS = ("fast", "standard", "rejected")
COLORS = {"fast": "#d9480f", "standard": "#1c7ed6", "rejected": "#868e96"}
EXTRA_HINT = "pip install 'policy-engine[report]'"


class ReportError(PolicyEngineError):
    """A report cannot be made as asked (e.g. the plotting extra is not installed)."""


def require_plotly() -> Any:
    """The plotly package, or ReportError naming the extra that installs it."""
    try:
        import plotly  # noqa: F401
        import plotly.graph_objects as go
    except ImportError:
        raise ReportError(f"--format html needs plotly, which the 'report' extra installs: {EXTRA_HINT}") from None
    return go


# -- collecting ----------------------------------------------------------------------------


class RecordingLedger(MemoryLedger):
    """The replay's ledger, keeping what each first settle recorded until the timeline takes it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recorded: list[Charge] = []

    def settle(self, reservation_id: str, charges: Sequence[Charge]) -> bool:
        first = super().settle(reservation_id, charges)
        if first:
            self.recorded.extend(charges)
        return first


@dataclass
class _Hour:
    fast: int = 0
    standard: int = 0
    rejected: int = 0
    cost: int = 0
    all_standard: int = 0
    saved_s: float = 0.0
    all_fast_saved_s: float = 0.0


@dataclass
class _Line:
    """One budget key's spend: (time, spent in the window then) steps, micro-dollars."""

    points: list[tuple[float, int]] = field(default_factory=list)
    scope: str = ""
    expires_at: float = 0.0
    spent: int = 0
    peak: int = 0


@dataclass
class _Budget:
    name: str
    window: str
    counts: str
    limit: int
    lines: dict[str, _Line] = field(default_factory=dict)


class Timeline:
    """Per hour figures and per budget key spend of one replay, fed outcome by outcome."""

    def __init__(self, compiled: CompiledPolicy, ledger: RecordingLedger) -> None:
        self.policy = compiled.name
        self.version = compiled.version
        self.ledger = ledger
        self.hours: dict[int, _Hour] = {}
        self.budgets: dict[str, _Budget] = {
            b.name: _Budget(b.name, b.window, b.counts, int(b.limit_usd * 1_000_000)) for b in compiled.policy.budgets}

    def add(self, o: Outcome) -> None:
        hour = self.hours.get(int(o.at // 3600))
        if hour is None:
            hour = self.hours[int(o.at // 3600)] = _Hour()
        setattr(hour, o.speed, getattr(hour, o.speed) + 1)
        hour.all_standard += o.standard_micro
        if o.fast_latency_s is not None:
            hour.all_fast_saved_s += o.standard_latency_s - o.fast_latency_s
        if o.speed != "rejected":
            hour.cost += o.cost_micro
            hour.saved_s += o.standard_latency_s - o.latency_s
        recorded = self.ledger.recorded
        for scope, amount in recorded:
            if amount:
                self._charge(scope.budget, scope.key, scope.id, scope.limit, scope.expires_at, amount, o.at)
        recorded.clear()

    def _charge(self, budget: str, key: str, scope: str, limit: int, expires_at: float, amount: int, at: float) -> None:
        track = self.budgets.get(budget)
        if track is None:  # not in the policy's list (cannot happen today): still drawn
            track = self.budgets[budget] = _Budget(budget, "", "", limit)
        line = track.lines.get(key)
        if line is None:
            line = track.lines[key] = _Line()
        if line.scope != scope:
            if line.scope:  # the previous window ended: its spend drops back to zero there
                line.points.append((line.expires_at, 0))
            line.scope, line.expires_at, line.spent = scope, expires_at, 0
        line.spent += amount
        line.peak = max(line.peak, line.spent)
        if line.points and line.points[-1][0] == at:
            line.points[-1] = (at, line.spent)
        else:
            line.points.append((at, line.spent))

    def hour_keys(self) -> list[int]:
        return sorted(self.hours)


def _timeline(compiled: CompiledPolicy, catalog: Catalog) -> tuple[Replayer, Timeline]:
    replayer = Replayer(compiled, catalog, ledger=RecordingLedger)
    ledger = replayer.ledger
    assert isinstance(ledger, RecordingLedger)
    return replayer, Timeline(compiled, ledger)


# -- running -------------------------------------------------------------------------------


def replay_simulate(compiled: CompiledPolicy, lines: Iterable[tuple[int, str]], catalog: Catalog | None = None,
                    progress: Callable[[int], None] | None = None) -> tuple[Report, Timeline]:
    """Replay `lines` through `compiled`, keeping the timeline the charts draw."""
    replayer, timeline = _timeline(compiled, catalog or load_catalog())
    return replayer.run(lines, on_outcome=timeline.add, progress=progress), timeline


def replay_diff(old: CompiledPolicy, new: CompiledPolicy, lines: Iterable[tuple[int, str]],
                catalog: Catalog | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[DiffReport, Timeline, Timeline]:
    """Replay `lines` through both policies, keeping each one's timeline."""
    catalog = catalog or load_catalog()
    (a, ta), (b, tb) = _timeline(old, catalog), _timeline(new, catalog)

    def both(first: Outcome, second: Outcome) -> None:
        ta.add(first)
        tb.add(second)

    return diff(a, b, lines, catalog, progress=progress, on_outcome=both), ta, tb


def simulate_markdown(report: Report, timeline: Timeline) -> str:
    return report.render_markdown() + "\n" + mermaid_chart(timeline)


def diff_markdown(result: DiffReport, old: Timeline, new: Timeline) -> str:
    return result.render_markdown() + "\n" + mermaid_chart(new, old=old)


def run_simulate(compiled: CompiledPolicy, lines: Iterable[tuple[int, str]], fmt: str, catalog: Catalog | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[Report, str]:
    """Replay and render in `fmt` (text, json, markdown or html); only markdown and html keep a timeline."""
    if fmt == "html":
        require_plotly()
    if fmt not in ("markdown", "html"):
        report = Replayer(compiled, catalog or load_catalog()).run(lines, progress=progress)
        return report, report.render(fmt)
    report, timeline = replay_simulate(compiled, lines, catalog, progress)
    return report, (simulate_markdown if fmt == "markdown" else render_simulate)(report, timeline)


def run_diff(old: CompiledPolicy, new: CompiledPolicy, lines: Iterable[tuple[int, str]], fmt: str,
             catalog: Catalog | None = None, progress: Callable[[int], None] | None = None) -> tuple[DiffReport, str]:
    """Replay through both policies and render in `fmt` (text, json, markdown or html)."""
    if fmt == "html":
        require_plotly()
    if fmt not in ("markdown", "html"):
        result = diff(old, new, lines, catalog or load_catalog(), progress=progress)
        return result, result.render(fmt)
    result, ta, tb = replay_diff(old, new, lines, catalog, progress)
    return result, (diff_markdown if fmt == "markdown" else render_diff)(result, ta, tb)


# -- figures shared by both pages ----------------------------------------------------------


def _usd(micro: int) -> float:
    return float(to_usd(micro))


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hours(timelines: Sequence[Timeline]) -> list[int]:
    """Every hour any of the timelines saw, so old and new share one axis."""
    return sorted({h for t in timelines for h in t.hours})


def _thin(points: list[tuple[float, int]], limit: int = MAX_POINTS) -> list[tuple[float, int]]:
    """At most about `limit` steps: the last value of each time step, and every drop to zero (a new window)."""
    if len(points) <= limit:
        return points
    step = (points[-1][0] - points[0][0]) / limit or 1.0
    out: list[tuple[float, int]] = []
    for t, v in points:
        if out and v and out[-1][1] and int(out[-1][0] // step) == int(t // step):
            out[-1] = (t, v)
        else:
            out.append((t, v))
    return out


def _budget_figure(go: Any, name: str, sides: Sequence[tuple[str, Timeline]]) -> tuple[Any, str]:
    """One budget's spend per key against its limit; `sides` is [("", t)] or [("old", a), ("new", b)]."""
    fig = go.Figure()
    budgets = [(label, t.budgets[name]) for label, t in sides if name in t.budgets]
    keys: dict[str, float] = {}
    for _, b in budgets:
        for key, line in b.lines.items():
            keys[key] = max(keys.get(key, 0.0), line.peak / b.limit if b.limit else float(line.peak))
    shown = sorted(keys, key=lambda k: (-keys[k], k))[:MAX_KEYS]
    start = min((t.hour_keys()[0] * 3600 for _, t in sides if t.hours), default=0)
    end = max(((t.hour_keys()[-1] + 1) * 3600 for _, t in sides if t.hours), default=3600)
    for label, b in budgets:
        dash = "dot" if label == "old" else "solid"
        for key in shown:
            line = b.lines.get(key)
            if line is None:
                continue
            points = _thin(line.points)
            fig.add_trace(go.Scatter(
                x=[_time(t) for t, _ in points], y=[_usd(v) for _, v in points], mode="lines",
                line={"shape": "hv", "dash": dash}, name=f"{label + ' ' if label else ''}{key}",
                meta={"kind": "spend", "side": label or "policy", "budget": name, "key": key,
                      "peak_usd": _usd(line.peak)}))
        fig.add_trace(go.Scatter(
            x=[_time(start), _time(end)], y=[_usd(b.limit)] * 2, mode="lines",
            line={"color": "#c92a2a", "dash": "dash" if label != "old" else "dot", "width": 2},
            name=f"{label + ' ' if label else ''}limit ${_usd(b.limit):,.2f}",
            meta={"kind": "limit", "side": label or "policy", "budget": name, "limit_usd": _usd(b.limit)}))
    first = budgets[-1][1] if budgets else None
    hidden = len(keys) - len(shown)
    what = f"counts {first.counts}, per {first.window} window" if first and first.window else ""
    title = f"Budget <b>{html.escape(name)}</b>: spend in the window against the limit ({what})"
    fig.update_layout(title=title, yaxis_title="USD spent in the window", xaxis_title="time (UTC)",
                      legend_title="key", hovermode="x unified", height=380, margin={"t": 60, "b": 40})
    note = f"{len(keys)} keys charged; the {len(shown)} closest to the limit are drawn." if hidden else ""
    if not keys:
        note = "Nothing was charged to this budget over the log."
    return fig, note


def _spend_figure(go: Any, sides: Sequence[tuple[str, Timeline]]) -> Any:
    hours = _hours([t for _, t in sides])
    x = [_time(h * 3600) for h in hours]
    fig = go.Figure()
    for label, t in sides:
        name = f"{label} policy" if label else "this policy"
        fig.add_trace(go.Bar(x=x, y=[_usd(t.hours[h].cost) if h in t.hours else 0.0 for h in hours], name=name,
                             meta={"kind": "cost", "side": label or "policy"},
                             marker={"color": "#adb5bd" if label == "old" else "#1971c2"}))
    base = sides[-1][1]
    fig.add_trace(go.Scatter(x=x, y=[_usd(base.hours[h].all_standard) if h in base.hours else 0.0 for h in hours],
                             name="all standard", mode="lines", line={"color": "#2f9e44", "dash": "dash"},
                             meta={"kind": "all_standard"}))
    fig.update_layout(title="Spend per hour", yaxis_title="USD", xaxis_title="hour (UTC)", barmode="group",
                      height=360, margin={"t": 60, "b": 40})
    return fig


def _speed_figure(go: Any, sides: Sequence[tuple[str, Timeline]]) -> Any:
    from plotly.subplots import make_subplots

    hours = _hours([t for _, t in sides])
    x = [_time(h * 3600) for h in hours]
    fig = make_subplots(rows=len(sides), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{label} policy" for label, _ in sides] if len(sides) > 1 else None)
    for row, (label, t) in enumerate(sides, 1):
        for speed in SPEEDS:
            fig.add_trace(go.Bar(x=x, y=[getattr(t.hours[h], speed) if h in t.hours else 0 for h in hours],
                                 name=speed, legendgroup=speed, showlegend=row == 1,
                                 marker={"color": COLORS[speed]},
                                 meta={"kind": "speed", "side": label or "policy", "speed": speed}), row=row, col=1)
    fig.update_layout(title="Speed mix per hour (requests)", barmode="stack", height=300 + 160 * len(sides),
                      margin={"t": 70, "b": 40})
    return fig


def _latency_figure(go: Any, sides: Sequence[tuple[str, Timeline]]) -> Any:
    hours = _hours([t for _, t in sides])
    x = [_time((h + 1) * 3600) for h in hours]
    fig = go.Figure()

    def cumulative(t: Timeline, attr: str) -> list[float]:
        total, out = 0.0, []
        for h in hours:
            total += getattr(t.hours[h], attr) if h in t.hours else 0.0
            out.append(round(total / 3600, 4))
        return out

    for label, t in sides:
        fig.add_trace(go.Scatter(x=x, y=cumulative(t, "saved_s"), mode="lines+markers",
                                 name=f"{label} policy" if label else "this policy",
                                 line={"dash": "dot" if label == "old" else "solid"},
                                 meta={"kind": "latency_saved", "side": label or "policy"}))
    fig.add_trace(go.Scatter(x=x, y=cumulative(sides[-1][1], "all_fast_saved_s"), mode="lines", name="all fast",
                             line={"color": "#868e96", "dash": "dash"}, meta={"kind": "all_fast_saved"}))
    fig.update_layout(title="Latency saved against all-standard, cumulative", yaxis_title="hours saved",
                      xaxis_title="time (UTC)", height=360, margin={"t": 60, "b": 40})
    return fig


def _rules_figure(go: Any, sides: Sequence[tuple[str, Report]]) -> Any:
    from plotly.subplots import make_subplots

    totals: dict[str, int] = {}
    for _, r in sides:
        for rule, counts in r.rules.items():
            totals[rule] = max(totals.get(rule, 0), sum(counts.values()))
    rules = sorted(totals, key=lambda k: (totals[k], k))  # plotly draws the first category at the bottom
    fig = make_subplots(rows=1, cols=len(sides), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"{label} policy" for label, _ in sides] if len(sides) > 1 else None)
    for col, (label, r) in enumerate(sides, 1):
        for speed in SPEEDS:
            fig.add_trace(go.Bar(y=rules, x=[r.rules[k].get(speed, 0) if k in r.rules else 0 for k in rules],
                                 orientation="h", name=speed, legendgroup=speed, showlegend=col == 1,
                                 marker={"color": COLORS[speed]},
                                 meta={"kind": "rule", "side": label or "policy", "speed": speed}), row=1, col=col)
    fig.update_layout(title="Decisions by rule (requests)", barmode="stack", height=160 + 40 * max(len(rules), 2),
                      margin={"t": 70, "b": 40, "l": 10})
    fig.update_yaxes(automargin=True)
    return fig


# -- pages ---------------------------------------------------------------------------------


_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #212529; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #dee2e6; padding: .3rem .7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.note { color: #495057; font-style: italic; }
.chart { border: 1px solid #e9ecef; margin: .5rem 0 1.5rem; }
code { background: #f1f3f5; padding: 0 .2rem; }
"""


class _Page:
    """An HTML page with plotly.js inlined once and figures in numbered divs."""

    def __init__(self, title: str) -> None:
        self.go = require_plotly()
        self.title = title
        self.parts: list[str] = []
        self.charts: list[str] = []

    def text(self, markup: str) -> None:
        self.parts.append(markup)

    def table(self, head: Sequence[str], rows: Iterable[Sequence[object]], css_id: str) -> None:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.parts.append(f'<table id="{css_id}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>')

    def chart(self, fig: Any, div_id: str, note: str = "") -> None:
        self.charts.append(div_id)
        fig.update_layout(template="plotly_white", font={"family": "system-ui, sans-serif"})
        self.parts.append(f'<div class="chart">{fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False, "responsive": True})}</div>')
        if note:
            self.parts.append(f'<p class="note">{html.escape(note)}</p>')

    def render(self, data: dict[str, Any]) -> str:
        from plotly.offline import get_plotlyjs

        payload = json.dumps(data, indent=None).replace("</", "<\\/")
        return "\n".join([
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(self.title)}</title>", f"<style>{_STYLE}</style>",
            f"<script>{get_plotlyjs()}</script>", "</head><body>", *self.parts,
            f'<script type="application/json" id="report-data">{payload}</script>',
            f'<script type="application/json" id="report-charts">{json.dumps(self.charts)}</script>',
            "</body></html>", ""])


def _summary(page: _Page, report: Report) -> None:
    d = report.decided
    page.table(["", *SPEEDS], [["requests", *(f"{report.speeds.get(s, 0)} ({_pct(report.speeds.get(s, 0), d)})"
                                            for s in SPEEDS)]], "speed-mix")
    page.table(["scenario", "cost", "fast premium", "latency saved"], report._rows(), "scenarios")
    reasons = [("downgrade", k, v) for k, v in report.downgrades.most_common()]
    reasons += [("reject", k, v) for k, v in report.rejects.most_common()]
    if reasons:
        page.table(["", "reason", "requests"], reasons, "reasons")
    if report.unpriced:
        page.text(f'<p class="note">{report.unpriced} requests use a model the catalog cannot price; they count as $0.</p>')
    if report.invalid:
        page.text(f'<p class="note">{report.invalid} invalid log lines were skipped.</p>')


def _charts(page: _Page, sides: Sequence[tuple[str, Timeline]], reports: Sequence[tuple[str, Report]]) -> None:
    go = page.go
    names = list(dict.fromkeys(name for _, t in sides for name in t.budgets))
    page.text("<h2>Budgets</h2>")
    if not names:
        page.text('<p class="note">The policy has no budgets.</p>')
    for index, name in enumerate(names):
        fig, note = _budget_figure(go, name, sides)
        page.chart(fig, f"chart-budget-{index}", note)
    page.text("<h2>Spend per hour</h2>")
    page.chart(_spend_figure(go, sides), "chart-spend")
    page.text("<h2>Speed mix per hour</h2>")
    page.chart(_speed_figure(go, sides), "chart-speed-mix")
    page.text("<h2>Latency saved</h2>")
    page.chart(_latency_figure(go, sides), "chart-latency")
    page.text("<h2>Decisions by rule</h2>")
    page.chart(_rules_figure(go, reports), "chart-rules")


def render_simulate(report: Report, timeline: Timeline) -> str:
    """The simulate page: one self-contained HTML document."""
    page = _Page(f"Simulation of {report.policy} @{report.version}")
    page.text(f"<h1>Simulation of <code>{html.escape(report.policy)}</code> @{html.escape(report.version)} "
              f"over {report.decided} requests</h1>")
    _summary(page, report)
    _charts(page, [("", timeline)], [("", report)])
    return page.render(report.to_dict())


def render_diff(result: DiffReport, old: Timeline, new: Timeline) -> str:
    """The diff page: old against new in every chart, and the decisions that change."""
    o, n = result.old, result.new
    page = _Page(f"Policy change: {o.policy} @{o.version} -> {n.policy} @{n.version}")
    page.text(f"<h1>Policy change: <code>{html.escape(o.policy)}</code> @{html.escape(o.version)} → "
              f"<code>{html.escape(n.policy)}</code> @{html.escape(n.version)}</h1>")
    page.text(f"<p>Replayed over {o.decided} requests: <b>{_changes(result.changed)}</b>, cost "
              f"<b>{html.escape(_signed(n.cost - o.cost))}</b>, latency "
              f"<b>{html.escape(_signed_s(n.latency_s - o.latency_s))}</b>.</p>")
    page.table(["", "old", "new"], result._head(), "old-new")
    if result.changes:
        rows = [(c.count, f"{f} → {t}", nrule if orule == nrule else f"{orule} → {nrule}", _signed(c.cost_delta),
                 _signed_s(c.latency_delta_s), ", ".join(map(str, c.lines))) for (f, t, orule, nrule), c in result._sorted()]
        page.table(["requests", "change", "rule", "cost Δ", "latency Δ", "e.g. lines"], rows, "changes")
    _charts(page, [("old", old), ("new", new)], [("old", o), ("new", n)])
    return page.render(result.to_dict())


# -- markdown ------------------------------------------------------------------------------


def _steps(hours: list[int]) -> int:
    """Hours per column so that the chart has at most MAX_BARS columns."""
    span = hours[-1] - hours[0] + 1
    for step in (1, 2, 3, 4, 6, 12, 24, 48, 72, 168):
        if span / step <= MAX_BARS:
            return step
    return -(-span // MAX_BARS)


def mermaid_chart(new: Timeline, old: Timeline | None = None) -> str:
    """Spend per hour (or per longer step) as a mermaid xychart-beta block, which GitHub renders.

    Bars: this policy's spend (the new one's in a diff); line: the all-standard baseline, or
    the old policy's spend in a diff. xychart has no legend, so a caption says which is which."""
    sides = [new] if old is None else [old, new]
    hours = _hours(sides)
    if not hours:
        return "_No requests were decided: no chart._\n"
    step = _steps(hours)
    first = hours[0] - hours[0] % step
    columns = list(range(first, hours[-1] + 1, step))

    def series(t: Timeline, attr: str) -> list[float]:
        values = []
        for start in columns:
            micro = sum(getattr(t.hours[h], attr) for h in range(start, start + step) if h in t.hours)
            values.append(round(_usd(micro), 2))
        return values

    bars = series(new, "cost")
    line = series(new, "all_standard") if old is None else series(old, "cost")
    top = max([*bars, *line, 0.01])
    label = "%m-%d %H:00" if step < 24 else "%m-%d"
    names = [datetime.fromtimestamp(c * 3600, timezone.utc).strftime(label) for c in columns]
    unit = "hour" if step == 1 else f"{step} hours"
    caption = ("Bars: this policy's spend; line: the same requests all at standard speed."
               if old is None else "Bars: the new policy's spend; line: the old policy's.")
    return "\n".join([
        "```mermaid", "xychart-beta", f'    title "Spend per {unit} (USD, UTC)"',
        "    x-axis [" + ", ".join(f'"{n}"' for n in names) + "]",
        f'    y-axis "USD" 0 --> {top * 1.1:.2f}',
        "    bar [" + ", ".join(f"{v:.2f}" for v in bars) + "]",
        "    line [" + ", ".join(f"{v:.2f}" for v in line) + "]", "```", "", f"_{caption}_", ""])
