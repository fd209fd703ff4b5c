"""Decision logs (issue 16, part 1): one record per request that ended, from the engine, the SDK middleware and
the httpx transports, through every sink, written off the request path; never a byte of prompt text.

Records are read back from the real sinks (the file on disk, a real `logging` handler, the OpenTelemetry SDK's
in-memory log exporter) and checked against the format's pydantic model and its generated JSON Schema."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import multiprocessing
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

from policy_engine.decide import Engine, load
from policy_engine.decisionlog import DecisionLog, DecisionRecord, JsonlFile, LoggerSink, OtelLogSink, Sink
from policy_engine.errors import CeilingExceeded
from policy_engine.integrations.anthropic import FastModePolicy, policy_context
from policy_engine.integrations.httpx import FastModeTransport
from policy_engine.ledger.sqlite import SqliteLedger
from policy_engine.testing.emulator import Emulator
from tests._emulator import emulator, engine_for, event_count, messages_params, write_policy  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "schemas" / "decision-record.schema.json").read_text())
MARKER = "ZQXJ-MARKER"
API_KEY = f"sk-ant-{MARKER}-key"
CONTEXT = {"interactive": True, "latency_slo_ms": 1_000, "tenant": "acme", "user": "user-5150",
           "labels": {"team": "search", "ticket": "T-1"}}


def marked_params(**extra: Any) -> dict[str, Any]:
    """A request with a marker in every place prompt content, tool inputs or ids can hide."""
    return {
        "model": "claude-opus-5", "max_tokens": 64,
        "system": [{"type": "text", "text": f"system {MARKER}", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "lookup", "description": f"tool {MARKER}",
                   "input_schema": {"type": "object", "properties": {MARKER: {"type": "string"}}}}],
        "messages": [
            {"role": "user", "content": f"question {MARKER}"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup",
                                               "input": {MARKER: f"tool input {MARKER}"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": f"tool result {MARKER}"}]},
        ],
        "metadata": {"user_id": f"end-user-{MARKER}"},
        "stop_sequences": [f"stop {MARKER}"],
        **extra,
    }


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.records.append(record.decision_record)  # type: ignore[attr-defined]


class Sinks:
    """One log writing to all three real sinks at once."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "decisions.jsonl"
        self.handler = Captured()
        self.logger = logging.getLogger(f"test.decisions.{id(self)}")
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.exporter = InMemoryLogRecordExporter()
        self.provider = LoggerProvider()
        self.provider.add_log_record_processor(SimpleLogRecordProcessor(self.exporter))
        self.log = DecisionLog([JsonlFile(self.path), LoggerSink(self.logger), OtelLogSink(self.provider)])

    def file_records(self) -> list[dict[str, Any]]:
        assert self.log.flush()
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def texts(self) -> dict[str, str]:
        """Everything each sink holds, as text."""
        self.log.flush()
        otel = [json.dumps(dict(r.log_record.body), default=str) + json.dumps(dict(r.log_record.attributes or {}))
                for r in self.exporter.get_finished_logs()]
        return {"file": self.path.read_text(), "logging": "\n".join(self.handler.messages)
                + json.dumps(self.handler.records), "otel": "\n".join(otel)}


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[Sinks]:
    s = Sinks(tmp_path)
    yield s
    s.log.close()


def valid(record: dict[str, Any]) -> dict[str, Any]:
    DecisionRecord.model_validate(record)
    jsonschema.validate(record, SCHEMA)
    return record


def sdk(emulator: Emulator, engine: Engine, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=emulator.url, api_key=API_KEY, middleware=[FastModePolicy(engine)], **options)


# -- what a record never holds ------------------------------------------------------------------


def test_no_prompt_text_tool_input_or_key_reaches_any_sink(tmp_path: Path, emulator: Emulator, sinks: Sinks) -> None:
    engine = engine_for(tmp_path, "on_fast_rate_limited: fallback\n", decision_log=sinks.log)
    client = sdk(emulator, engine)
    emulator.inject(429, speed="fast", retry_after="1")
    with policy_context(**CONTEXT):
        client.messages.create(**marked_params())  # a fast 429, then standard
        client.messages.create(**marked_params())
        with client.messages.stream(**marked_params()) as stream:
            stream.until_done()
    for transport_kind in ("sync",):
        with httpx.Client(base_url=emulator.url, transport=FastModeTransport(engine, context=CONTEXT)) as raw:
            raw.post("/v1/messages", json=marked_params(), headers={"x-api-key": API_KEY,
                                                                   "anthropic-version": "2023-06-01"})
    texts = sinks.texts()
    records = sinks.file_records()
    assert len(records) == 4 and all(valid(r)["event"] == "settled" for r in records)
    assert len(sinks.handler.records) == 4 and len(sinks.exporter.get_finished_logs()) == 4
    for sink, text in texts.items():
        assert MARKER not in text, f"a marker reached the {sink} sink"
    # The test can fail: the markers were on the wire, and the same record with the prompt would hold them.
    assert any(MARKER in json.dumps(r["body"]) for r in emulator.requests())


# -- what a record holds ------------------------------------------------------------------------


def test_a_settled_request_records_its_features_usage_cost_and_timing(tmp_path: Path, emulator: Emulator,
                                                                       sinks: Sinks) -> None:
    engine = engine_for(tmp_path, decision_log=sinks.log)
    client = sdk(emulator, engine)
    with policy_context(**CONTEXT):
        message = client.messages.create(**messages_params(max_tokens=50))
        with client.messages.stream(**messages_params(max_tokens=50)) as stream:
            streamed = stream.get_final_message()
    plain, live = (valid(r) for r in sinks.file_records())
    assert plain["decision"]["speed"] == "fast" and plain["decision"]["rule"] == "default"
    assert plain["policy"] == {"name": "always-fast", "version": engine.policy().version}
    request = plain["features"]["request"]
    assert request["model"] == "claude-opus-5" and request["max_tokens"] == 50 and request["message_count"] == 1
    assert request["stream"] is False and live["features"]["request"]["stream"] is True
    assert plain["features"]["context"]["tenant"] == "acme"
    assert plain["usage"]["output_tokens"] == message.usage.output_tokens
    assert plain["cost_micro"] > 0
    assert plain["latency"]["stream"] is False and plain["latency"]["total_s"] > 0 and plain["latency"]["ttft_s"] is None
    assert live["latency"]["stream"] is True and 0 < live["latency"]["ttft_s"] <= live["latency"]["total_s"]
    assert live["usage"]["output_tokens"] == streamed.usage.output_tokens
    assert plain["history"] == [{"speed": "fast", "status": 200, "action": "done", "wait_s": 0.0}]
    assert set(plain["ratelimit"]["headers"]) >= {"anthropic-fast-output-tokens-remaining"}
    # Decided before the first response named the key's account; the headers were recorded for it.
    assert plain["features"]["account"] == "default" and plain["ratelimit"]["account"].startswith("key:")
    assert live["features"]["account"] == plain["ratelimit"]["account"]


def test_a_fast_429_fallback_is_in_the_history(tmp_path: Path, emulator: Emulator, sinks: Sinks) -> None:
    engine = engine_for(tmp_path, "on_fast_rate_limited: fallback\n", decision_log=sinks.log)
    emulator.inject(429, speed="fast", retry_after="7")
    sdk(emulator, engine).messages.create(**messages_params())
    (record,) = sinks.file_records()
    assert [(a["speed"], a["status"], a["action"]) for a in record["history"]] == [
        ("fast", 429, "fallback"), ("standard", 200, "done")]
    assert record["usage"]["speed"] == "standard" and record["ratelimit"]["status"] == 200


def test_rejected_and_released_requests_are_recorded(tmp_path: Path, emulator: Emulator, sinks: Sinks) -> None:
    engine = engine_for(tmp_path, "ceilings:\n  per_request_usd: 0.000001\n", decision_log=sinks.log)
    with pytest.raises(CeilingExceeded):
        sdk(emulator, engine).messages.create(**messages_params())
    open_engine = engine_for(tmp_path, decision_log=sinks.log)
    dead = FastModePolicy.attach(anthropic.Anthropic(base_url="http://127.0.0.1:9", api_key=API_KEY, max_retries=0),
                                 open_engine)
    with pytest.raises(anthropic.APIConnectionError):
        dead.messages.create(**messages_params())
    rejected, released = (valid(r) for r in sinks.file_records())
    assert rejected["event"] == "rejected" and rejected["decision"]["outcome"] == "rejected"
    assert rejected["decision"]["forced_by"] == "per_request" and rejected["usage"] is None
    assert released["event"] == "released" and released["cost_micro"] is None
    assert released["history"] == [{"speed": "fast", "status": None, "action": "error", "wait_s": 0.0}]


def test_the_engine_alone_records_a_request_once(tmp_path: Path, sinks: Sinks) -> None:
    engine = load(write_policy(tmp_path), decision_log=sinks.log)
    decision = engine.decide(messages_params(), CONTEXT)
    engine.settle(decision, {"input_tokens": 10, "output_tokens": 20})
    engine.settle(decision, {"input_tokens": 10, "output_tokens": 20})  # records nothing the second time
    engine.release(decision)
    (record,) = sinks.file_records()
    assert record["event"] == "settled" and record["latency"] is None and record["history"] == []


def test_async_clients_record_too(tmp_path: Path, emulator: Emulator, sinks: Sinks) -> None:
    engine = engine_for(tmp_path, decision_log=sinks.log)

    async def run() -> None:
        client = anthropic.AsyncAnthropic(base_url=emulator.url, api_key=API_KEY, middleware=[FastModePolicy(engine)])
        await asyncio.gather(*(client.messages.create(**messages_params()) for _ in range(3)))

    asyncio.run(run())
    assert [r["event"] for r in sinks.file_records()] == ["settled"] * 3


# -- privacy settings -----------------------------------------------------------------------------


BUDGETS = """
budgets:
  - name: per_user
    key: context.user
    window: day
    limit_usd: 5
  - name: per_tenant
    key: context.tenant
    window: day
    limit_usd: 50
"""


def test_ids_are_hashed_and_labels_filtered_as_configured(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    with DecisionLog(path, hash_context=("user", "tenant"), secret="fleet secret", labels=("team",)) as log:
        engine = load(write_policy(tmp_path, BUDGETS), decision_log=log)
        engine.settle(engine.decide(messages_params(), CONTEXT), {"input_tokens": 1, "output_tokens": 1})
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    context = record["features"]["context"]
    assert context["user"].startswith("#") and context["tenant"].startswith("#")
    assert context["labels"] == {"team": "search"}
    assert {s["budget"]: s["key"] for s in record["scopes"]} == {"per_user": context["user"], "per_tenant": context["tenant"]}
    assert "user-5150" not in path.read_text() and "acme" not in path.read_text() and "T-1" not in path.read_text()


def test_scopes_are_hashed_where_the_ledger_hashes_them(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    with DecisionLog(path, hash_context=()) as log:
        engine = load(write_policy(tmp_path, BUDGETS), decision_log=log,
                      ledger=SqliteLedger(tmp_path / "l.db", hash_scopes=True))
        engine.settle(engine.decide(messages_params(), CONTEXT), {"input_tokens": 1, "output_tokens": 1})
        engine.ledger.close()
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["features"]["context"]["tenant"] == "acme"  # the context as configured: kept
    assert all(s["key"].startswith("#") for s in record["scopes"]) and len(record["scopes"]) == 2


# -- off the request path ------------------------------------------------------------------------


class Stuck(Sink):
    """A sink that holds the writer until released: the queue behind it fills up."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.records: list[dict[str, Any]] = []

    def write(self, records: Sequence[dict[str, Any]], lines: Sequence[str]) -> None:
        self.entered.set()
        assert self.go.wait(10)
        self.records.extend(records)


def test_a_full_queue_drops_and_counts_never_blocks(tmp_path: Path, telemetry: Any) -> None:
    sink = Stuck()
    log = DecisionLog(sink, queue_size=2)
    engine = load(write_policy(tmp_path), decision_log=log)

    def one() -> None:
        engine.settle(engine.decide(messages_params()), {"input_tokens": 1, "output_tokens": 1})

    one()
    assert sink.entered.wait(5)  # the writer is stuck inside the first batch
    for _ in range(9):
        one()  # returns at once: two wait in the queue, seven are dropped
    assert log.dropped == 7
    sink.go.set()
    assert log.flush()
    one()
    assert log.flush()
    log.close()
    assert len(sink.records) == 4
    assert sum(r["dropped"] for r in sink.records) == 7 and sink.records[0]["dropped"] == 0
    assert event_count(telemetry, "policy_engine.decision_log_dropped") == 7


def test_sampling_keeps_rejects_and_downgrades(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    with DecisionLog(path, sample=0.0) as log:
        engine = load(write_policy(tmp_path, "ceilings:\n  per_request_usd: 0.01\n"), decision_log=log)
        for _ in range(5):
            engine.settle(engine.decide(messages_params(max_tokens=10)), {"input_tokens": 1, "output_tokens": 1})
        with pytest.raises(CeilingExceeded):
            engine.decide(messages_params(max_tokens=100_000))
        engine.release(engine.decide(messages_params(max_tokens=200)))  # fast over the ceiling: downgraded
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["decision"]["outcome"] for r in records] == ["rejected", "downgraded"]
    assert all(r["sample_rate"] == 1.0 for r in records)


# -- the JSON Lines file ---------------------------------------------------------------------------


def read_all(path: Path) -> list[dict[str, Any]]:
    lines: list[str] = []
    for file in sorted(path.parent.glob(path.name + "*")):
        if file.name.endswith(".lock"):
            continue
        data = gzip.decompress(file.read_bytes()) if file.name.endswith(".gz") else file.read_bytes()
        lines += data.decode().splitlines()
    return [json.loads(line) for line in lines]


def test_the_file_rotates_by_size_and_compresses(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    log = DecisionLog(JsonlFile(path, max_bytes=4_000, compress=True))
    engine = load(write_policy(tmp_path), decision_log=log)
    for _ in range(30):
        engine.settle(engine.decide(messages_params()), {"input_tokens": 1, "output_tokens": 1})
        log.flush()
    log.close()
    rotated = sorted(p.name for p in tmp_path.glob("d.jsonl.*") if not p.name.endswith(".lock"))
    assert len(rotated) >= 3 and all(name.endswith(".gz") for name in rotated)
    assert len(read_all(path)) == 30


def test_the_file_keeps_only_its_backups(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    log = DecisionLog(JsonlFile(path, max_bytes=1, backups=2))
    engine = load(write_policy(tmp_path), decision_log=log)
    for _ in range(6):
        engine.settle(engine.decide(messages_params()), {"input_tokens": 1, "output_tokens": 1})
        log.flush()
    log.close()
    assert len([p for p in tmp_path.glob("d.jsonl.*") if not p.name.endswith(".lock")]) == 2


def _child(engine: Engine, log: DecisionLog, first: int) -> None:
    for max_tokens in range(first, first + 5):
        engine.settle(engine.decide(messages_params(max_tokens=max_tokens)), {"input_tokens": 1, "output_tokens": 1})
    log.close()


def test_forked_workers_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    log = DecisionLog(JsonlFile(path, max_bytes=3_000))
    engine = load(write_policy(tmp_path), decision_log=log)
    engine.settle(engine.decide(messages_params(max_tokens=1)), {"input_tokens": 1, "output_tokens": 1})  # the writer runs
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_child, args=(engine, log, first)) for first in (10, 20, 30)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    for max_tokens in range(40, 45):
        engine.settle(engine.decide(messages_params(max_tokens=max_tokens)), {"input_tokens": 1, "output_tokens": 1})
    log.close()
    seen = sorted(r["features"]["request"]["max_tokens"] for r in read_all(path))
    assert seen == [1, *range(10, 15), *range(20, 25), *range(30, 35), *range(40, 45)]  # every request once, none torn
