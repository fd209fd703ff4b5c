"""`calibrate`: decision logs written through the real SDK against the emulator give back its configured speeds."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import pytest

from policy_engine.catalog import load_catalog
from policy_engine.cli import main
from policy_engine.decide import load
from policy_engine.decisionlog import DecisionLog, DecisionRecord, JsonlFile
from policy_engine.decisionlog.calibrate import calibrate
from policy_engine.integrations.anthropic import FastModePolicy, policy_context
from policy_engine.simulate import iter_log, open_log
from policy_engine.testing.emulator import Emulator

STANDARD_OTPS, FAST_RATIO, TTFT_S = 1_000.0, 2.5, 0.1
# 0.25 s at standard, 0.1 s fast, in deltas of 25 tokens: the per-request and per-delta overheads (a few ms and
# a fraction of one) stay far below 10% of what they add to.
OUTPUT_TOKENS = 250
POLICY = """
version: 1
name: by-label
default: standard
rules:
  - name: asked-fast
    when: context.interactive
    speed: fast
  - name: slow-when-long
    when: throughput.est_fast_s > 1.0
    speed: standard
"""
LATENCY_POLICY = """
version: 1
name: latency
default: standard
rules:
  - name: fast-only-when-it-saves-half-a-second
    when: model.fast_available && throughput.est_standard_s - throughput.est_fast_s > 0.5
    speed: fast
"""


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decision log of 8 streams and 4 non-streaming requests at each speed, through the SDK middleware."""
    tmp = tmp_path_factory.mktemp("calib")
    (tmp / "policy.yaml").write_text(POLICY)
    path = tmp / "decisions.jsonl"
    log = DecisionLog(JsonlFile(path))
    engine = load(tmp / "policy.yaml", decision_log=log)
    emu = Emulator(standard_otps=STANDARD_OTPS, fast_ratio=FAST_RATIO, ttft_s=TTFT_S, output_tokens=OUTPUT_TOKENS,
                   delta_tokens=25, min_cache_tokens=0)
    with emu:
        client = anthropic.Anthropic(base_url=emu.url, api_key="sk-test", middleware=[FastModePolicy(engine)])
        params = {"model": "claude-opus-5", "max_tokens": 400, "messages": [{"role": "user", "content": "Hello"}]}
        for fast in (False, True):
            with policy_context(interactive=fast):
                for _ in range(8):
                    with client.messages.stream(**params) as stream:
                        stream.until_done()
                for _ in range(4):
                    client.messages.create(**params)
    assert log.flush()
    log.close()
    return path


def _lines(path: Path) -> list[tuple[int, str]]:
    with open_log(str(path)) as stream:
        return list(iter_log(stream))


def test_the_log_holds_valid_records_of_both_speeds(log_path: Path) -> None:
    records = [DecisionRecord.model_validate_json(text) for _, text in _lines(log_path)]
    assert len(records) == 24
    assert {(r.decision.speed, r.latency.stream) for r in records if r.latency} == {
        ("standard", True), ("standard", False), ("fast", True), ("fast", False)}


def test_calibrate_recovers_the_emulators_speeds_within_ten_percent(log_path: Path) -> None:
    result = calibrate(_lines(log_path))
    assert result.read == 24 and result.used == 24, result.skipped
    standard = result.groups[("claude-opus-5", "claude_api", "standard")]
    fast = result.groups[("claude-opus-5", "claude_api", "fast")]
    assert (standard.streams, standard.non_streams, len(standard.otps), len(standard.ttft)) == (8, 4, 12, 8)
    block = result.overlay()["providers"]["anthropic"]["models"]["claude-opus-5"]["throughput"]
    assert block["standard_otps"] == pytest.approx(STANDARD_OTPS, rel=0.10)
    assert block["fast_otps"] == pytest.approx(STANDARD_OTPS * FAST_RATIO, rel=0.10)
    assert block["ttft_s"] == pytest.approx(TTFT_S, rel=0.10)
    assert block["assumption"] is False and block["samples"] == 24
    assert block["observed_from"] <= block["observed_to"]
    assert fast.otps and sorted(fast.otps)[0] > sorted(standard.otps)[-1]  # no overlap between the speeds


def test_the_overlay_feeds_latency_rules(log_path: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "measured.yaml"
    assert main(["calibrate", str(log_path), "-o", str(overlay), "--format", "json"]) == 0
    catalog = load_catalog(overlay)
    figures = catalog.model("claude-opus-5").throughput
    assert figures is not None and figures.assumption is False and figures.samples == 24
    assert figures.standard_otps == pytest.approx(STANDARD_OTPS, rel=0.10)
    assert figures.observed_from is not None
    # Packaged: 60 vs 120 otps: 500 output tokens save 4.2 s, so fast. Measured (1000 vs 2500): 0.5 s vs 0.2 s.
    (tmp_path / "p.yaml").write_text(LATENCY_POLICY)
    request = {"model": "claude-opus-5", "max_tokens": 500, "messages": [{"role": "user", "content": "Hi"}]}
    assert load(tmp_path / "p.yaml").decide(request).speed == "fast"
    measured = load(tmp_path / "p.yaml", catalog=str(overlay))
    decision = measured.decide(request)
    assert decision.speed == "standard"
    request["max_tokens"] = 2000  # 2.0 s vs 0.8 s: over half a second saved
    assert measured.decide(request).speed == "fast"


def test_text_report_shows_percentiles_and_skips(log_path: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(log_path.read_text() + '{"request": {"model": "x"}}\nnot json\n')
    assert main(["calibrate", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert "26 records read, 24 used: skipped 1 not a decision record, 1 not JSON" in out
    assert "p10" in out and "p99" in out and "stdev" in out and "output_tps" in out
    data = calibrate(_lines(mixed)).to_dict()
    ttft = next(g for g in data["groups"] if g["speed"] == "standard")["ttft_s"]
    assert ttft["p10"] <= ttft["p50"] <= ttft["p90"] <= ttft["p99"] and ttft["count"] == 8


def test_bad_input_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"record": "policy_engine.decision", "event": "released"}\n')
    assert main(["calibrate", str(empty)]) == 1
    assert "no record had the timings" in capsys.readouterr().out


def test_other_platforms_get_their_own_figures(log_path: Path, tmp_path: Path) -> None:
    lines = []
    for number, text in _lines(log_path):
        record = json.loads(text)
        record["decision"].update(platform="bedrock", model="anthropic.claude-opus-5")
        lines.append((number, json.dumps(record)))
    result = calibrate(lines)
    assert set(result.groups) == {("claude-opus-5", "bedrock", "standard"), ("claude-opus-5", "bedrock", "fast")}
    overlay = tmp_path / "bedrock.yaml"
    overlay.write_text(result.overlay_yaml())
    catalog = load_catalog(overlay)
    on_bedrock = catalog.find("anthropic.claude-opus-5", platform="bedrock")
    assert on_bedrock is not None and on_bedrock.throughput is not None
    assert on_bedrock.throughput.assumption is False
    assert on_bedrock.throughput.standard_otps == pytest.approx(STANDARD_OTPS, rel=0.10)
    packaged = catalog.model("claude-opus-5").throughput
    assert packaged is not None and packaged.assumption is True  # the Claude API keeps the packaged figures
