"""`import-otel`: GenAI spans written by the real OpenTelemetry SDK, serialized by its OTLP encoder, become
decision-log lines that validate as records and calibrate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToJson
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from policy_engine.cli import main
from policy_engine.decisionlog import DecisionRecord
from policy_engine.decisionlog.calibrate import calibrate
from policy_engine.decisionlog.otel import ASSUMED, convert

T0 = 1_796_245_000_000_000_000  # 2026-12-02, nanoseconds


def _spans() -> str:
    """Spans as an instrumentation following today's GenAI conventions writes them, as OTLP JSON."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("anthropic-instrumentation")

    def span(name: str, attrs: dict[str, Any], start: int, seconds: float, error: bool = False) -> None:
        s = tracer.start_span(name, attributes=attrs, start_time=start)
        if error:
            s.set_status(Status(StatusCode.ERROR, "overloaded"))
        s.end(end_time=start + int(seconds * 1e9))

    base = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
            "gen_ai.request.model": "claude-opus-5", "gen_ai.request.max_tokens": 1024}
    for i in range(10):  # streams: 1 s before the first chunk, then 500 tokens at 100 tokens/s
        span("chat claude-opus-5", {**base, "gen_ai.request.stream": True, "gen_ai.response.time_to_first_chunk": 1.0,
                                    "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 500,
                                    "gen_ai.usage.cache_read.input_tokens": 1000,
                                    "gen_ai.usage.cache_creation.input_tokens": 0,
                                    "gen_ai.conversation.id": "conv-1"}, T0 + i * 10**10, 6.0)
    span("chat claude-opus-5", {**base, "gen_ai.usage.input_tokens": 50, "gen_ai.usage.output_tokens": 100},
         T0 + 2 * 10**11, 2.0)
    span("chat claude-opus-5", {**base, "gen_ai.usage.input_tokens": 50}, T0, 1.0, error=True)
    span("embeddings x", {"gen_ai.operation.name": "embeddings", "gen_ai.provider.name": "anthropic",
                          "gen_ai.request.model": "claude-opus-5"}, T0, 0.1)
    span("chat gpt", {**base, "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-5"}, T0, 0.1)
    span("chat bedrock", {**base, "gen_ai.provider.name": "aws.bedrock", "gen_ai.request.model": "anthropic.claude-opus-5",
                          "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 20}, T0, 1.0)
    span("GET /", {"http.request.method": "GET"}, T0, 0.1)
    return MessageToJson(encode_spans(exporter.get_finished_spans()))


def test_spans_become_valid_records_with_the_documented_defaults() -> None:
    records, report = convert(_spans())
    assert (report.spans, report.converted) == (16, 12)
    assert report.skipped == {"failed request (error status)": 1, "operation embeddings (not a Messages request)": 1,
                              "not an Anthropic model": 1, "no gen_ai.provider.name": 1}
    parsed = [DecisionRecord.model_validate(r) for r in records]
    stream = parsed[0]
    assert stream.usage == {"input_tokens": 200, "output_tokens": 500, "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 1000, "speed": "standard"}
    request = stream.features.request
    assert request["input_tokens"] == 1200 and request["max_tokens"] == 1024 and request["stream"] is True
    assert request["cache_control"] is True and request["has_tools"] is False and request["platform"] == "claude_api"
    assert stream.features.context == {"conversation_id": "conv-1"}
    assert stream.latency is not None and stream.latency.total_s == pytest.approx(6.0)
    assert stream.latency.ttft_s == 1.0 and stream.latency.output_tps == pytest.approx(100.0)
    assert stream.ts.startswith("2026-12-02T") and stream.source is not None and stream.source.kind == "otel"
    assert stream.source.assumed == list(ASSUMED)
    plain = parsed[10]
    assert plain.features.request["stream"] is False and plain.latency.ttft_s is None
    assert plain.usage["input_tokens"] == 50 and plain.features.request["cache_control"] is False
    assert parsed[11].decision.platform == "bedrock"


def test_converted_spans_calibrate(tmp_path: Path) -> None:
    records, _ = convert(_spans())
    result = calibrate([(n, json.dumps(r)) for n, r in enumerate(records, 1)])
    block = result.overlay()["providers"]["anthropic"]["models"]["claude-opus-5"]["throughput"]
    # Streams: 6 s = 1 s + 500 tokens at 100/s; the non-stream: 2 s - 1 s for 100 tokens: 100/s too.
    assert block["standard_otps"] == pytest.approx(100.0) and block["ttft_s"] == pytest.approx(1.0)
    assert block["assumption"] is True and "fast_otps still the catalog's assumption" in block["note"]


def test_the_cli_writes_lines_and_reports_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spans = tmp_path / "spans.json"
    spans.write_text(_spans())
    out = tmp_path / "decisions.jsonl"
    assert main(["import-otel", str(spans), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "16 spans read, 12 converted; skipped:" in err and "assumed for every record" in err
    lines = out.read_text().splitlines()
    assert len(lines) == 12 and all(DecisionRecord.model_validate_json(line) for line in lines)
    # The collector's file exporter: one document per line.
    jsonl = tmp_path / "spans.jsonl"
    jsonl.write_text(json.dumps(json.loads(_spans())) + "\n" + json.dumps(json.loads(_spans())) + "\n")
    assert main(["import-otel", str(jsonl), "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 24


def test_bad_input_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"resourceSpans": []}\nnot json\n')
    assert main(["import-otel", str(bad)]) == 2
    assert "line 2: not OTLP JSON" in capsys.readouterr().err
    bad.write_text('{"resourceLogs": []}')
    assert main(["import-otel", str(bad)]) == 2
    assert "no `resourceSpans` list" in capsys.readouterr().err
    assert main(["import-otel", str(tmp_path / "none.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_converted_lines_replay_through_simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spans = tmp_path / "spans.json"
    spans.write_text(_spans())
    out = tmp_path / "decisions.jsonl"
    assert main(["import-otel", str(spans), "-o", str(out)]) == 0
    capsys.readouterr()
    policy = Path(__file__).parent.parent / "policies" / "latency-first.yaml"
    assert main(["simulate", str(policy), "--requests", str(out), "--format", "json", "--strict"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"]["decided"] == 12 and report["requests"]["with_usage"] == 12
    assert report["requests"]["invalid"] == 0 and report["requests"]["missing_features"] == {}
    # The spans say nothing of the caller: the replay decides them as a non-interactive caller's.
    assert report["speed_mix"]["fast"] == 0
