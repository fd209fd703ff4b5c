"""`simulate` / `diff` reports people look at: the HTML page in a real headless Chromium, the
mermaid chart of the markdown comment, and the by-rule table.

The browser test opens the page from a file with the network off (the context is offline and
every request but the page's own file fails the test), waits for plotly to draw every chart,
fails on any console error, then checks the drawn elements and that the figures the charts
hold are the replay's: totals against `--format json`, budget lines against the budget limits
and an independent sum of the replay's outcomes."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from policy_engine.cli import main
from policy_engine.compile import compile_file
from policy_engine.simulate import Outcome, Replayer, iter_log, open_log
from tests._report import report_policy as _policy

ROOT = Path(__file__).resolve().parent.parent
LOG = ROOT / "data" / "requests.jsonl.gz"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine notes say Chromium must run here: no sandbox as root, no GPU, and none of the
# background connections (updates, sync, safe browsing) a closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions"]

def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def _outcomes(policy: Path) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with open_log(str(LOG)) as stream:
        Replayer(compile_file(str(policy))).run(iter_log(stream), on_outcome=outcomes.append)
    return outcomes


# -- markdown -------------------------------------------------------------------------------


def _mermaid(markdown: str) -> dict[str, Any]:
    block = re.search(r"```mermaid\n(.*?)\n```", markdown, re.S)
    assert block, markdown
    body = block.group(1)
    assert body.startswith("xychart-beta\n")
    numbers = lambda name: [float(v) for v in re.search(rf"^\s+{name} \[(.*)\]$", body, re.M).group(1).split(", ")]  # noqa: E731
    labels = re.search(r'^\s+x-axis \[(.*)\]$', body, re.M).group(1)
    return {"bar": numbers("bar"), "line": numbers("line"), "x": re.findall(r'"([^"]*)"', labels),
            "top": float(re.search(r'y-axis "USD" 0 --> ([0-9.]+)', body).group(1))}


def test_simulate_markdown_has_the_by_rule_table_and_a_spend_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = _policy(tmp_path, "p.yaml")
    status, out, _ = _cli(["simulate", str(policy), "--requests", str(LOG), "--format", "json"], capsys)
    data = json.loads(out)
    status, markdown, _ = _cli(["simulate", str(policy), "--requests", str(LOG), "--format", "markdown"], capsys)
    assert status == 0
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| (\d+ \| \d+ \| \d+) \|$", markdown, re.M))
    assert set(rows) == set(data["rules"])
    for rule, counts in data["rules"].items():
        assert rows[rule] == " | ".join(str(counts.get(s, 0)) for s in ("fast", "standard", "rejected"))
    chart = _mermaid(markdown)
    hours = {o.at // 3600 for o in _outcomes(policy)}
    assert len(chart["x"]) == len(chart["bar"]) == len(chart["line"]) == max(hours) - min(hours) + 1
    # Each column is one hour's spend, rounded to cents: they add up to the report's totals.
    assert sum(chart["bar"]) == pytest.approx(float(data["cost"]["total_usd"]), abs=0.005 * len(chart["bar"]))
    assert sum(chart["line"]) == pytest.approx(float(data["baselines"]["all_standard"]["cost_usd"]),
                                               abs=0.005 * len(chart["line"]))
    assert chart["top"] >= max(chart["bar"] + chart["line"])
    assert "Bars: this policy's spend" in markdown


def test_diff_markdown_charts_old_against_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = _policy(tmp_path, "old.yaml"), _policy(tmp_path, "new.yaml", premium=20, daily=600)
    status, out, _ = _cli(["diff", str(old), str(new), "--requests", str(LOG), "--format", "json"], capsys)
    data = json.loads(out)
    status, markdown, _ = _cli(["diff", str(old), str(new), "--requests", str(LOG), "--format", "markdown"], capsys)
    assert status == 0
    chart = _mermaid(markdown)
    assert sum(chart["bar"]) == pytest.approx(float(data["new"]["cost"]["total_usd"]), abs=0.005 * len(chart["bar"]))
    assert sum(chart["line"]) == pytest.approx(float(data["old"]["cost"]["total_usd"]), abs=0.005 * len(chart["line"]))
    assert sum(chart["bar"]) > sum(chart["line"])  # a larger premium budget spends more
    assert "Bars: the new policy's spend; line: the old policy's." in markdown


def test_mermaid_chart_merges_hours_past_48_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Four lines over 30 days: one column per day (12 hours would make 60), and the empty days are zero.
    policy = _policy(tmp_path, "p.yaml")
    request = {"model": "claude-opus-5-5", "max_tokens": 4000, "messages": [{"role": "user", "content": "hi"}]}
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"ts": ts, "request": request, "input_tokens": 10}) + "\n"
                           for ts in ("2026-03-01T01:00:00Z", "2026-03-01T05:00:00Z", "2026-03-10T10:00:00Z",
                                      "2026-03-30T23:00:00Z")))
    status, markdown, _ = _cli(["simulate", str(policy), "--requests", str(log), "--format", "markdown"], capsys)
    chart = _mermaid(markdown)
    assert chart["x"] == [f"03-{day:02d}" for day in range(1, 31)]
    assert 'title "Spend per 24 hours (USD, UTC)"' in markdown
    assert [i for i, v in enumerate(chart["bar"]) if v > 0] == [0, 9, 29]


# -- the extra ------------------------------------------------------------------------------


def test_html_without_plotly_is_a_usage_error_naming_the_extra(tmp_path: Path) -> None:
    # sys.modules[name] = None is Python's own way to make an import fail (ImportError).
    code = ("import sys; sys.modules['plotly'] = None; from policy_engine.cli import main; "
            f"sys.exit(main(['simulate', {str(_policy(tmp_path, 'p.yaml'))!r}, '--requests', {str(LOG)!r}, '--format', 'html']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "pip install 'policy-engine[report]'" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the page in a real browser -------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed; `make test` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def _open(browser: Any, page_file: Path) -> tuple[Any, dict[str, Any]]:
    """The page loaded offline with every chart drawn; fails on console errors or any request."""
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    url = page_file.resolve().as_uri()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}") if r.url != url else None)

    def route(r: Any) -> None:
        if r.request.url == url:
            r.continue_()
        else:
            problems.append(f"the page asked for {r.request.url}")
            r.abort()

    page.route("**/*", route)
    page.goto(url, wait_until="load")
    charts = json.loads(page.inner_text("#report-charts"))
    page.wait_for_function(
        """ids => ids.every(id => { const gd = document.getElementById(id);
              return gd && gd._fullLayout && gd.querySelector('svg.main-svg') && gd.querySelector('.cartesianlayer .trace'); })""",
        arg=charts, timeout=30_000)
    page.wait_for_timeout(200)  # a console error raised while drawing has been delivered by now
    figures = page.evaluate(
        """ids => Object.fromEntries(ids.map(id => { const gd = document.getElementById(id);
              return [id, {data: gd.data.map(t => ({name: t.name, x: t.x, y: t.y, meta: t.meta || {}})),
                           title: gd.layout.title && gd.layout.title.text,
                           bars: gd.querySelectorAll('.barlayer .point path').length,
                           tall: [...gd.querySelectorAll('.barlayer .point path')].filter(e => e.getBBox().height > 0.01).length,
                           lines: gd.querySelectorAll('.scatterlayer .trace path.js-line').length,
                           legend: [...gd.querySelectorAll('.legendtext')].map(e => e.textContent),
                           ticks: [...gd.querySelectorAll('.ytick text')].map(e => e.textContent)}]; }))""",
        charts)
    external = page.evaluate("[...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))")
    assert external == [], external
    assert problems == [], problems
    return page, figures


def _by(figure: dict[str, Any], **meta: str) -> list[dict[str, Any]]:
    return [t for t in figure["data"] if all(t["meta"].get(k) == v for k, v in meta.items())]


def _nonzero(values: list[float]) -> int:
    return sum(1 for v in values if v)


def _check_common(figures: dict[str, Any], data: dict[str, Any], side: str) -> None:
    """The speed, spend, latency and rule charts of one side hold the report's figures."""
    speed = figures["chart-speed-mix"]
    for name in ("fast", "standard", "rejected"):
        (trace,) = _by(speed, side=side, speed=name)
        assert sum(trace["y"]) == data["speed_mix"][name]
    spend = figures["chart-spend"]
    (cost,) = _by(spend, kind="cost", side=side)
    assert sum(cost["y"]) == pytest.approx(float(data["cost"]["total_usd"]), abs=1e-6 * len(cost["y"]))
    latency = figures["chart-latency"]
    (saved,) = _by(latency, kind="latency_saved", side=side)
    assert saved["y"][-1] * 3600 == pytest.approx(data["latency"]["saved_s"], abs=1.0)
    assert saved["y"] == sorted(saved["y"]) or data["latency"]["saved_s"] < 0  # cumulative
    rules = figures["chart-rules"]
    for name in ("fast", "standard", "rejected"):
        (trace,) = _by(rules, side=side, speed=name)
        shown = dict(zip(trace["y"], trace["x"]))
        assert shown == {rule: counts.get(name, 0) for rule, counts in data["rules"].items()}
    assert set(rules["ticks"]) == set(data["rules"])


def test_simulate_html_in_headless_chromium(tmp_path: Path, capsys: pytest.CaptureFixture[str], browser: Any) -> None:
    policy = _policy(tmp_path, "p.yaml")
    status, out, _ = _cli(["simulate", str(policy), "--requests", str(LOG), "--format", "json"], capsys)
    data = json.loads(out)
    assert data["speed_mix"]["fast"] and data["speed_mix"]["rejected"]  # the page has something of each to show
    status, page_html, err = _cli(["simulate", str(policy), "--requests", str(LOG), "--format", "html"], capsys)
    assert status == 0, err
    assert "<script src" not in page_html
    report = tmp_path / "report.html"
    report.write_text(page_html, encoding="utf-8")
    page, figures = _open(browser, report)

    assert sorted(figures) == ["chart-budget-0", "chart-budget-1", "chart-latency", "chart-rules", "chart-speed-mix",
                               "chart-spend"]
    _check_common(figures, data, "policy")
    speed = figures["chart-speed-mix"]
    assert speed["bars"] == sum(len(t["y"]) for t in speed["data"])  # one bar per hour and speed,
    assert speed["tall"] == sum(_nonzero(t["y"]) for t in speed["data"])  # of a height where it counts any
    assert {"fast", "standard", "rejected"} <= set(speed["legend"])

    # Budgets: each drawn against its limit; no key ever spent past it (the money guarantee, as the
    # reviewer sees it); and the org-wide line ends at the last UTC day's spend, summed independently.
    premium, daily = figures["chart-budget-0"], figures["chart-budget-1"]
    assert "tenant_premium" in premium["title"] and "org_daily" in daily["title"]
    for figure, limit in ((premium, 5.0), (daily, 400.0)):
        (line,) = _by(figure, kind="limit")
        assert line["y"] == [limit, limit] and f"limit ${limit:,.2f}" in figure["legend"]
        spends = _by(figure, kind="spend")
        assert spends and figure["lines"] >= len(spends) + 1
        assert max(max(t["y"]) for t in spends) <= limit
    keys = {t["meta"]["key"] for t in _by(premium, kind="spend")}
    assert keys and keys <= {"acme", "globex", "hooli", "initech", "umbrella", "untagged"}
    outcomes = _outcomes(policy)
    last_day = datetime.fromtimestamp(outcomes[-1].at, timezone.utc).date()
    spent = sum(o.cost_micro for o in outcomes
                if o.speed != "rejected" and datetime.fromtimestamp(o.at, timezone.utc).date() == last_day)
    (org,) = _by(daily, kind="spend")
    assert Decimal(str(org["y"][-1])) == Decimal(spent) / 1_000_000
    assert org["y"].count(0) >= 1  # the window reset at midnight shows as a drop to zero
    assert page.inner_text("#scenarios").count("$") >= 6
    page.context.close()


def test_diff_html_in_headless_chromium(tmp_path: Path, capsys: pytest.CaptureFixture[str], browser: Any) -> None:
    old, new = _policy(tmp_path, "old.yaml"), _policy(tmp_path, "new.yaml", premium=20, daily=600)
    status, out, _ = _cli(["diff", str(old), str(new), "--requests", str(LOG), "--format", "json"], capsys)
    data = json.loads(out)
    status, page_html, err = _cli(["diff", str(old), str(new), "--requests", str(LOG), "--format", "html"], capsys)
    assert status == 0, err
    report = tmp_path / "diff.html"
    report.write_text(page_html, encoding="utf-8")
    page, figures = _open(browser, report)

    _check_common(figures, data["old"], "old")
    _check_common(figures, data["new"], "new")
    for figure, limits in ((figures["chart-budget-0"], {"old": 5.0, "new": 20.0}),
                           (figures["chart-budget-1"], {"old": 400.0, "new": 600.0})):
        for side, limit in limits.items():
            (line,) = _by(figure, kind="limit", side=side)
            assert line["y"] == [limit, limit]
            assert max(max(t["y"]) for t in _by(figure, kind="spend", side=side)) <= limit
    assert len(page.query_selector_all("#changes tbody tr")) == len(data["changes"]) > 0
    assert page.inner_text("#old-new").count("$") == 4
    legend = figures["chart-spend"]["legend"]
    assert "old policy" in legend and "new policy" in legend
    page.context.close()


def test_html_escapes_what_the_log_says(tmp_path: Path, capsys: pytest.CaptureFixture[str], browser: Any) -> None:
    # A budget key comes from the caller's context: markup in it is text on the page, never markup.
    policy = _policy(tmp_path, "p.yaml")
    request = {"model": "claude-opus-5-5", "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]}
    evil = "</script><img src=x onerror=alert(1)>"
    log = tmp_path / "log.jsonl.gz"
    with gzip.open(log, "wt") as f:
        f.write(json.dumps({"ts": "2026-12-02T10:00:00Z", "request": request, "input_tokens": 20,
                            "context": {"tenant": evil, "interactive": True}}) + "\n")
    status, page_html, err = _cli(["simulate", str(policy), "--requests", str(log), "--format", "html"], capsys)
    assert status == 0, err
    report = tmp_path / "r.html"
    report.write_text(page_html, encoding="utf-8")
    page, figures = _open(browser, report)  # no request for "x", no error
    (spend,) = _by(figures["chart-budget-0"], kind="spend")
    assert spend["meta"]["key"] == evil
    assert page.query_selector("img") is None
    page.context.close()
