"""Decision-log records from OpenTelemetry GenAI spans (OTLP JSON), so `simulate`, `diff` and `calibrate` read
what a team already records.

    records, report = convert(Path("spans.json").read_text())

Input: OTLP JSON documents (`{"resourceSpans": [...]}`, as the OTLP/HTTP JSON encoding and
protobuf's JSON mapping write them), one per file or one per line (the collector's file
exporter). Only Anthropic inference spans are converted: `gen_ai.provider.name` (or the older
`gen_ai.system`) `anthropic`, or `aws.bedrock` / `gcp.vertex_ai` / `azure.ai.inference` for a
Claude model, with `gen_ai.operation.name` `chat` (or absent), a `gen_ai.request.model` and the
usage. What a span supplies:

| record field | from |
|---|---|
| `features.request.model`, `decision.model` | `gen_ai.request.model` |
| `features.request.max_tokens` | `gen_ai.request.max_tokens` (absent: the output tokens, the least it can have been) |
| `usage` | `gen_ai.usage.input_tokens` (which includes cache reads and writes when the dotted cache attributes are used, as the conventions ask; the old underscore names mean Anthropic's own count), `gen_ai.usage.output_tokens`, `gen_ai.usage.cache_read.input_tokens`, `gen_ai.usage.cache_creation.input_tokens` |
| `features.request.input_tokens` | input + cache read + cache creation tokens (`input_tokens_exact: true`: the server counted them) |
| `features.request.stream`, `latency` | `gen_ai.request.stream`; span start and end (`total_s`), `gen_ai.response.time_to_first_chunk` (`ttft_s`) |
| `features.request.platform` | the provider name |
| `decision.speed` | `policy_engine.speed` when the span has it, else `standard` |
| `features.context.conversation_id` | `gen_ai.conversation.id` |

What no span supplies gets a default, listed in each record's `source.assumed`: `has_tools`,
`has_images`, `has_documents` false; `thinking` off; `service_tier` `auto`; `inference_geo`
`global`; `batch` false; `cache_control` true only when the usage shows cache reads or writes;
`message_count` 1; `betas` empty; the context empty but for the conversation id (so `interactive`
false, `priority` normal, no tenant or user); the account `default` (one fast rate-limit state);
no fast rate-limit headers; no fallbacks. A replay therefore decides these requests as plain
text requests of an anonymous caller.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, Final

from ..errors import PolicyEngineError
from ._record import RECORD_KIND, RECORD_VERSION

__all__ = ["ASSUMED", "ImportReport", "convert", "records_from_otlp"]

_PLATFORMS: Final = {"anthropic": "claude_api", "aws.bedrock": "bedrock", "gcp.vertex_ai": "vertex",
                     "gcp.gen_ai": "vertex", "azure.ai.inference": "foundry", "azure.ai.foundry": "foundry"}
_CHAT_OPERATIONS: Final = frozenset({"chat", "text_completion", "generate_content"})

ASSUMED: Final = ("has_tools", "has_images", "has_documents", "thinking", "service_tier", "inference_geo", "batch",
                  "cache_control", "message_count", "betas", "context", "account", "ratelimit", "fallbacks")
"""The features no GenAI span carries: a converted record holds documented defaults for them."""


class ImportReport:
    """What a conversion did: spans read, records written, spans skipped by reason."""

    def __init__(self) -> None:
        self.spans = 0
        self.converted = 0
        self.skipped: Counter[str] = Counter()
        self.max_tokens_assumed = 0

    def render(self) -> str:
        text = f"{self.spans} spans read, {self.converted} converted"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        if self.max_tokens_assumed:
            text += f"; {self.max_tokens_assumed} without gen_ai.request.max_tokens (set to their output tokens)"
        return text + "\nassumed for every record (no span carries them): " + ", ".join(ASSUMED)


def convert(text: str) -> tuple[list[dict[str, Any]], ImportReport]:
    """Decision records from OTLP JSON text: one document, or JSON Lines of documents."""
    report = ImportReport()
    records = list(records_from_otlp(_documents(text), report))
    return records, report


def _documents(text: str) -> Iterator[Any]:
    stripped = text.strip()
    if not stripped:
        return
    try:
        yield json.loads(stripped)
        return
    except ValueError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise PolicyEngineError(f"line {number}: not OTLP JSON: {exc}") from None


def records_from_otlp(documents: Iterable[Any], report: ImportReport) -> Iterator[dict[str, Any]]:
    for number, document in enumerate(documents, 1):
        if not isinstance(document, Mapping) or not isinstance(document.get("resourceSpans"), list):
            raise PolicyEngineError(f"document {number}: not OTLP JSON traces (no `resourceSpans` list)")
        for resource_spans in document["resourceSpans"]:
            for scope_spans in _list(resource_spans, "scopeSpans", "instrumentationLibrarySpans"):
                for span in _list(scope_spans, "spans"):
                    report.spans += 1
                    record = _record(span, report)
                    if isinstance(record, str):
                        report.skipped[record] += 1
                    else:
                        report.converted += 1
                        yield record


def _list(container: Any, *names: str) -> list[Any]:
    if isinstance(container, Mapping):
        for name in names:
            value = container.get(name)
            if isinstance(value, list):
                return value
    return []


def _value(any_value: Any) -> Any:
    """An OTLP AnyValue as Python (int64 values arrive as strings in the JSON mapping)."""
    if not isinstance(any_value, Mapping):
        return None
    if "stringValue" in any_value:
        return any_value["stringValue"]
    if "boolValue" in any_value:
        return bool(any_value["boolValue"])
    if "intValue" in any_value:
        try:
            return int(any_value["intValue"])
        except (TypeError, ValueError):
            return None
    if "doubleValue" in any_value:
        try:
            return float(any_value["doubleValue"])
        except (TypeError, ValueError):
            return None
    if "arrayValue" in any_value:
        return [_value(v) for v in (any_value["arrayValue"] or {}).get("values") or ()]
    return None


def _attributes(span: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in span.get("attributes") or ():
        if isinstance(item, Mapping) and isinstance(item.get("key"), str):
            out[item["key"]] = _value(item.get("value"))
    return out


def _count(attrs: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = attrs.get(name)
        if type(value) is int and value >= 0:
            return value
    return None


def _nanos(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _record(span: Any, report: ImportReport) -> dict[str, Any] | str:
    """The record of one span, or why it was skipped."""
    if not isinstance(span, Mapping):
        return "not a span object"
    name = span.get("name")
    if isinstance(name, str) and name.startswith("policy_engine."):
        return "policy_engine's own span (its decision log has the records)"
    attrs = _attributes(span)
    provider = attrs.get("gen_ai.provider.name") or attrs.get("gen_ai.system")
    model = attrs.get("gen_ai.request.model")
    if provider is None:
        return "no gen_ai.provider.name"
    platform = _PLATFORMS.get(str(provider))
    if platform is None or (platform != "claude_api" and "claude" not in str(model).lower()):
        return "not an Anthropic model"
    operation = attrs.get("gen_ai.operation.name")
    if operation is not None and operation not in _CHAT_OPERATIONS:
        return f"operation {operation} (not a Messages request)"
    if not isinstance(model, str) or not model:
        return "no gen_ai.request.model"
    status = span.get("status")
    if attrs.get("error.type") or (isinstance(status, Mapping) and status.get("code") in (2, "STATUS_CODE_ERROR")):
        return "failed request (error status)"
    output = _count(attrs, "gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
    reported = _count(attrs, "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
    if output is None or reported is None:
        return "no gen_ai.usage input or output tokens"
    read = _count(attrs, "gen_ai.usage.cache_read.input_tokens")
    written = _count(attrs, "gen_ai.usage.cache_creation.input_tokens")
    if read is not None or written is not None:
        # Today's conventions: input_tokens counts every prompt token, cached ones included.
        read, written = read or 0, written or 0
        uncached = reported - read - written if reported >= read + written else reported
    else:
        # Older instrumentations: Anthropic's own input_tokens, with its underscore-named cache counts beside it.
        read = _count(attrs, "gen_ai.usage.cache_read_input_tokens") or 0
        written = _count(attrs, "gen_ai.usage.cache_creation_input_tokens") or 0
        uncached = reported
    start, end = _nanos(span.get("startTimeUnixNano")), _nanos(span.get("endTimeUnixNano"))
    if start is None or start <= 0:
        return "no start time"
    total_s = (end - start) / 1e9 if end is not None and end > start else None
    stream = attrs.get("gen_ai.request.stream")
    ttft = attrs.get("gen_ai.response.time_to_first_chunk")
    ttft = float(ttft) if isinstance(ttft, (int, float)) and not isinstance(ttft, bool) and ttft >= 0 else None
    stream = bool(stream) if isinstance(stream, bool) else ttft is not None
    max_tokens = _count(attrs, "gen_ai.request.max_tokens")
    if max_tokens is None:
        report.max_tokens_assumed += 1
        max_tokens = output
    speed = attrs.get("policy_engine.speed") if attrs.get("policy_engine.speed") in ("fast", "standard") else "standard"
    tps = None
    if total_s is not None and output:
        generation = total_s - ttft if stream and ttft is not None and total_s > ttft else total_s
        tps = round(output / generation, 6)
    context: dict[str, Any] = {}
    if isinstance(attrs.get("gen_ai.conversation.id"), str):
        context["conversation_id"] = attrs["gen_ai.conversation.id"]
    moment = datetime.fromtimestamp(start / 1e9, timezone.utc)
    return {
        "record": RECORD_KIND, "v": RECORD_VERSION,
        "ts": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}Z",
        "event": "settled",
        "policy": {"name": "(imported from OpenTelemetry)", "version": ""},
        "decision": {"speed": speed, "rule": "(imported)", "outcome": "allowed", "reasons": [], "guardrails": [],
                     "ceilings": [], "forced_by": None, "model": model, "platform": platform, "fast_beta": None,
                     "fast_model": None, "incomplete": None, "fallback_rewrites": [], "errors": [],
                     "estimate_micro": None, "reservation_id": None},
        "features": {
            "request": {"model": model, "max_tokens": max_tokens, "input_tokens": uncached + read + written,
                        "input_tokens_exact": True, "stream": stream, "has_tools": False, "has_images": False,
                        "has_documents": False, "thinking": {"enabled": False, "budget_tokens": 0},
                        "service_tier": "auto", "inference_geo": "global", "batch": False,
                        "cache_control": bool(read or written), "message_count": 1, "betas": [],
                        "platform": platform},
            "context": context, "fallbacks": None, "account": "default"},
        "scopes": [],
        "usage": {"input_tokens": uncached, "output_tokens": output, "cache_creation_input_tokens": written,
                  "cache_read_input_tokens": read, "speed": speed},
        "steps": [], "cost_micro": None,
        "latency": ({"stream": stream, "ttft_s": ttft if stream else None,
                     "total_s": None if total_s is None else round(total_s, 6), "output_tps": tps}
                    if total_s is not None else None),
        "ratelimit": None, "history": [], "sample_rate": 1.0, "dropped": 0,
        "source": {"kind": "otel", "trace_id": span.get("traceId"), "span_id": span.get("spanId"),
                   "assumed": list(ASSUMED) + ([] if _count(attrs, "gen_ai.request.max_tokens") is not None
                                               else ["max_tokens"])},
    }
