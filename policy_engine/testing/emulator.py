"""A local emulator of Anthropic's Messages API, for testing policies and integrations offline.

    from policy_engine.testing.emulator import running

    with running(fast_input_tokens_per_minute=6_000) as base_url:
        client = anthropic.Anthropic(base_url=base_url, api_key="test")
        ...

It is a real HTTP server on 127.0.0.1 (stdlib only) that reproduces the documented
behaviour fast mode depends on:

* validation: `speed` must be `fast` or `standard`; `speed: "fast"` needs the
  `fast-mode-2026-02-01` beta in `anthropic-beta`, a model whose catalog entry supports
  fast mode, and no Priority Tier; the Message Batches API refuses fast requests;
* fast-mode token buckets (input and output tokens per minute, replenished
  continuously), reported in the six `anthropic-fast-*` headers, and a 429 with
  `retry-after` when a fast request does not fit;
* `usage.speed`, and a prompt cache keyed by speed (a switch of speed misses);
* streaming in Anthropic's SSE event format, fast output `fast_ratio` (2.5) times faster;
* fault injection (any status, e.g. 529 or 500, and hangs), and `GET /_emulator/requests`
  to read back every request received, with what it billed.

Token counts are deterministic (`count_text_tokens`: one token per word or punctuation
mark) so tests can compute exact expected costs. Nothing here talks to the real API.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..catalog import Catalog, actual, load_catalog

__all__ = ["Emulator", "running", "count_text_tokens", "count_request_tokens", "FAST_BETA", "main"]

FAST_BETA = "fast-mode-2026-02-01"
_TOKEN = re.compile(r"\w+|[^\w\s]")
_MESSAGE_OVERHEAD = 3
_IMAGE_TOKENS = 85
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
}
_OPTIONS = (
    "standard_otps", "fast_ratio", "ttft_s", "output_tokens", "delta_tokens", "fast_input_tokens_per_minute",
    "fast_output_tokens_per_minute", "min_cache_tokens", "priority_tier", "require_api_key",
)


def count_text_tokens(text: str) -> int:
    """The emulator's tokenizer: one token per run of word characters or per punctuation mark."""
    return len(_TOKEN.findall(text))


def _value_tokens(value: Any) -> int:
    if isinstance(value, str):
        return count_text_tokens(value)
    return count_text_tokens(json.dumps(value, sort_keys=True))


def _block_tokens(block: Any) -> int:
    if isinstance(block, str):
        return count_text_tokens(block)
    if not isinstance(block, Mapping):
        return _value_tokens(block)
    kind = block.get("type")
    if kind == "text":
        return count_text_tokens(str(block.get("text", "")))
    if kind in ("image", "document"):
        return _IMAGE_TOKENS
    if kind == "tool_use":
        return count_text_tokens(str(block.get("name", ""))) + _value_tokens(block.get("input", {}))
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return sum(_block_tokens(b) for b in content)
        return _value_tokens(content)
    if kind == "thinking":
        return count_text_tokens(str(block.get("thinking", "")))
    return _value_tokens({k: v for k, v in block.items() if k != "cache_control"})


def _segments(params: Mapping[str, Any]) -> list[tuple[int, Any, Any]]:
    """The prompt in cache order (tools, system, messages): (tokens, canonical content, cache_control)."""
    segments: list[tuple[int, Any, Any]] = []
    for tool in params.get("tools") or ():
        content = {k: v for k, v in tool.items() if k != "cache_control"} if isinstance(tool, Mapping) else tool
        segments.append((_value_tokens(content), content, tool.get("cache_control") if isinstance(tool, Mapping) else None))
    system = params.get("system")
    if isinstance(system, str):
        segments.append((count_text_tokens(system), system, None))
    elif isinstance(system, list):
        for block in system:
            segments.append((_block_tokens(block), _canonical(block), _cache_control(block)))
    for message in params.get("messages") or ():
        if not isinstance(message, Mapping):
            continue
        segments.append((_MESSAGE_OVERHEAD, message.get("role"), None))
        content = message.get("content")
        if isinstance(content, str):
            segments.append((count_text_tokens(content), content, None))
        elif isinstance(content, list):
            for block in content:
                segments.append((_block_tokens(block), _canonical(block), _cache_control(block)))
    return segments


def _canonical(block: Any) -> Any:
    return {k: v for k, v in block.items() if k != "cache_control"} if isinstance(block, Mapping) else block


def _cache_control(block: Any) -> Any:
    return block.get("cache_control") if isinstance(block, Mapping) else None


def count_request_tokens(params: Mapping[str, Any]) -> int:
    """All input tokens of a Messages API request, as the emulator counts them (at least 1)."""
    return max(1, sum(tokens for tokens, _, _ in _segments(params)))


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(math.ceil(epoch), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class _Bucket:
    capacity: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + self.capacity / 60.0 * max(0.0, now - self.at))
        self.at = now

    def seconds_until(self, amount: float) -> float:
        return max(0.0, (min(amount, self.capacity) - self.level) * 60.0 / self.capacity) if self.capacity else math.inf


@dataclass
class _Fault:
    status: int | None
    times: int
    hang_s: float | None
    speed: str | None
    path: str
    retry_after: str | None


@dataclass
class _Plan:
    """How one admitted request will be answered."""

    model: str
    speed: str
    usage: dict[str, Any]
    output_tokens: int
    stop_reason: str
    headers: dict[str, str] = field(default_factory=dict)


class Emulator:
    """The emulator server. `start()` it (or use it as a context manager); `url` is its base URL."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        catalog: Catalog | None = None,
        standard_otps: float | None = 2_000.0,
        fast_ratio: float = 2.5,
        ttft_s: float = 0.0,
        output_tokens: int = 16,
        delta_tokens: int = 4,
        fast_input_tokens_per_minute: int = 10_000_000,
        fast_output_tokens_per_minute: int = 1_000_000,
        min_cache_tokens: int = 1_024,
        priority_tier: bool = False,
        require_api_key: bool = True,
    ) -> None:
        self.catalog = catalog or load_catalog()
        self._host, self._port = host, port
        self.standard_otps = standard_otps
        self.fast_ratio = fast_ratio
        self.ttft_s = ttft_s
        self.output_tokens = output_tokens
        self.delta_tokens = delta_tokens
        self.fast_input_tokens_per_minute = fast_input_tokens_per_minute
        self.fast_output_tokens_per_minute = fast_output_tokens_per_minute
        self.min_cache_tokens = min_cache_tokens
        self.priority_tier = priority_tier
        self.require_api_key = require_api_key
        self._lock = threading.Lock()
        self._log: list[dict[str, Any]] = []
        self._cache: dict[tuple[str, str, str], float] = {}
        self._buckets: dict[str, tuple[_Bucket, _Bucket]] = {}
        self._faults: list[_Fault] = []
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Emulator:
        emulator = self

        class Handler(_Handler):
            owner = emulator

        self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="policy-engine-emulator", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Emulator:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control -----------------------------------------------------------------------

    def configure(self, **options: Any) -> None:
        """Change options (the constructor's keyword arguments) while running."""
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(f"unknown emulator options: {', '.join(sorted(unknown))}; known: {', '.join(_OPTIONS)}")
        with self._lock:
            for name, value in options.items():
                setattr(self, name, value)
            if {"fast_input_tokens_per_minute", "fast_output_tokens_per_minute"} & set(options):
                self._buckets.clear()

    def reset(self) -> None:
        """Forget requests, the prompt cache, rate-limit buckets and pending faults."""
        with self._lock:
            self._log.clear()
            self._cache.clear()
            self._buckets.clear()
            self._faults.clear()

    def inject(self, status: int | None = 529, *, times: int = 1, hang_s: float | None = None, speed: str | None = None,
               path: str = "/v1/messages", retry_after: str | None = None) -> None:
        """Answer the next `times` matching requests with `status` (after hanging `hang_s` seconds).

        `status=None` with `hang_s` hangs and then answers normally. `speed` restricts the
        fault to requests at that speed; `path` to that endpoint.
        """
        with self._lock:
            self._faults.append(_Fault(status, times, hang_s, speed, path, retry_after))

    def requests(self) -> list[dict[str, Any]]:
        """Every request received so far (API key redacted), with status, speed and billed usage."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def billed(self) -> list[dict[str, Any]]:
        """The usage of every request that was served (and so billed), in order."""
        return [dict(e["usage"], model=e["model"]) for e in self.requests() if e.get("usage") is not None]

    def bill_micro(self) -> int:
        """The emulator's own bill, in micro-dollars: every token it served, priced by its catalog.

        Independent of any ledger: what the client was charged, to compare a ledger with.
        A stream cut short bills what was generated before the client went away."""
        return sum(actual(self.catalog.model(usage["model"]), usage) for usage in self.billed())

    # -- the API -----------------------------------------------------------------------

    def _take_fault(self, path: str, speed: str | None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path == path and (fault.speed is None or fault.speed == speed):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _validate_messages(self, params: Any, headers: Mapping[str, str], *, batch: bool = False) -> tuple[str, str]:
        if not isinstance(params, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        model = params.get("model")
        if not isinstance(model, str) or not model:
            raise _ApiError(400, "model: Field required")
        max_tokens = params.get("max_tokens")
        if type(max_tokens) is not int or max_tokens < 1:
            raise _ApiError(400, "max_tokens: must be a positive integer")
        messages = params.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "messages: at least one message is required")
        entry = self.catalog.find(model)
        if entry is None:
            raise _ApiError(404, f"model: {model}")
        speed = params.get("speed", "standard")
        if speed is None:
            speed = "standard"
        if speed not in ("standard", "fast"):
            raise _ApiError(400, f"speed: Input should be 'standard' or 'fast', got {speed!r}")
        if speed == "fast":
            if batch:
                raise _ApiError(400, "speed: fast mode is not available with the Batch API")
            betas = {b.strip() for b in headers.get("anthropic-beta", "").split(",")}
            beta = entry.fast.beta_header or FAST_BETA
            if beta not in betas:
                raise _ApiError(400, f"speed: 'fast' requires the anthropic-beta header {beta}")
            if not entry.fast.supported:
                raise _ApiError(400, f"speed: fast mode is not supported for model {model}")
            tier = params.get("service_tier") or "auto"
            if tier == "priority" or (self.priority_tier and tier == "auto"):
                raise _ApiError(400, "speed: fast mode is not available with Priority Tier")
        return model, speed

    def _cache_usage(self, params: Mapping[str, Any], model: str, speed: str, now: float) -> tuple[int, int, int, int]:
        """(uncached input, 5m cache writes, 1h cache writes, cache reads) for the request."""
        segments = _segments(params)
        total = max(1, sum(t for t, _, _ in segments))
        last = max((i for i, (_, _, cc) in enumerate(segments) if cc), default=None)
        if last is None and isinstance(params.get("cache_control"), Mapping):
            last = len(segments) - 1  # top-level cache_control caches the whole prompt
        if last is None:
            return total, 0, 0, 0
        prefix = segments[: last + 1]
        prefix_tokens = sum(t for t, _, _ in prefix)
        if prefix_tokens < self.min_cache_tokens:
            return total, 0, 0, 0
        control = prefix[-1][2] or params.get("cache_control") or {}
        ttl = 3_600.0 if isinstance(control, Mapping) and control.get("ttl") == "1h" else 300.0
        digest = hashlib.sha256(json.dumps([c for _, c, _ in prefix], sort_keys=True, default=str).encode()).hexdigest()
        key = (model, speed, digest)
        with self._lock:
            hit = self._cache.get(key, 0.0) > now
            self._cache[key] = now + ttl
        rest = total - prefix_tokens
        if hit:
            return rest, 0, 0, prefix_tokens
        return (rest, prefix_tokens, 0, 0) if ttl == 300.0 else (rest, 0, prefix_tokens, 0)

    def _admit_fast(self, account: str, input_tokens: int, output_tokens: int, now: float) -> dict[str, str]:
        with self._lock:
            buckets = self._buckets.get(account)
            if buckets is None:
                buckets = self._buckets[account] = (
                    _Bucket(self.fast_input_tokens_per_minute, self.fast_input_tokens_per_minute, now),
                    _Bucket(self.fast_output_tokens_per_minute, self.fast_output_tokens_per_minute, now),
                )
            ins, outs = buckets
            ins.refill(now)
            outs.refill(now)
            fits = ins.level >= min(input_tokens, ins.capacity) and outs.level >= min(output_tokens, outs.capacity)
            if fits:
                ins.level -= input_tokens
                outs.level -= output_tokens
            headers = {
                "anthropic-fast-input-tokens-limit": str(int(ins.capacity)),
                "anthropic-fast-input-tokens-remaining": str(max(0, int(ins.level))),
                "anthropic-fast-input-tokens-reset": _rfc3339(now + ins.seconds_until(ins.capacity)),
                "anthropic-fast-output-tokens-limit": str(int(outs.capacity)),
                "anthropic-fast-output-tokens-remaining": str(max(0, int(outs.level))),
                "anthropic-fast-output-tokens-reset": _rfc3339(now + outs.seconds_until(outs.capacity)),
            }
            if not fits:
                wait = max(ins.seconds_until(input_tokens), outs.seconds_until(output_tokens))
                raise _ApiError(429, "fast mode rate limit exceeded; retry after the given delay or use standard speed",
                                {**headers, "retry-after": str(max(1, math.ceil(wait)))})
        return headers

    def plan(self, params: dict[str, Any], headers: Mapping[str, str], output_tokens: int | None = None) -> _Plan:
        """Validate a Messages request and decide its usage (raises `_ApiError` with the API's status)."""
        model, speed = self._validate_messages(params, headers)
        now = time.time()
        wanted = self.output_tokens if output_tokens is None else output_tokens
        out = max(1, min(params["max_tokens"], wanted))
        stop = "max_tokens" if wanted > params["max_tokens"] else "end_turn"
        uncached, write_5m, write_1h, read = self._cache_usage(params, model, speed, now)
        extra: dict[str, str] = {}
        if speed == "fast":
            account = hashlib.sha256((headers.get("x-api-key") or headers.get("authorization") or "").encode()).hexdigest()
            extra = self._admit_fast(account, uncached + write_5m + write_1h, out, now)
        usage: dict[str, Any] = {
            "input_tokens": uncached,
            "cache_creation_input_tokens": write_5m + write_1h,
            "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
            "output_tokens": out,
            "service_tier": "standard",
            "speed": speed,
        }
        if params.get("inference_geo"):
            usage["inference_geo"] = params["inference_geo"]
        return _Plan(model, speed, usage, out, stop, extra)

    def otps(self, speed: str) -> float | None:
        if not self.standard_otps:
            return None
        return self.standard_otps * (self.fast_ratio if speed == "fast" else 1.0)

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._log.append(entry)

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}_emu{next(self._ids):012x}"


def _text_for(tokens: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + tokens))


class _Handler(BaseHTTPRequestHandler):
    owner: Emulator
    protocol_version = "HTTP/1.1"
    server_version = "policy-engine-emulator"

    def setup(self) -> None:
        super().setup()
        # Headers, body and SSE events are separate small writes: without this, Nagle's
        # algorithm and the client's delayed ACK add ~40 ms to responses and events.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            pass  # the client closed its connection: nothing left to answer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass  # tests read GET /_emulator/requests instead of a console log

    # -- plumbing ----------------------------------------------------------------------

    def _headers_dict(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def _read_body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.send_header("request-id", self.owner._next_id("req"))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # the client gave up (a hang outlived its timeout)

    def _send_error(self, error: _ApiError) -> None:
        kind = _ERROR_TYPES.get(error.status, "api_error")
        self._send_json(error.status, {"type": "error", "error": {"type": kind, "message": error.message}}, error.headers)

    def _entry(self, path: str, query: str, headers: dict[str, str], body: Any, stream: bool = False) -> dict[str, Any]:
        redacted = {k: ("<redacted>" if k in ("x-api-key", "authorization") else v) for k, v in headers.items()}
        return {"method": self.command, "path": path, "query": query, "headers": redacted, "body": body,
                "status": None, "speed": None, "usage": None, "model": None, "stream": stream, "at": time.time()}

    # -- routes ------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = urlsplit(self.path).path
        if path == "/_emulator/requests":
            self._send_json(200, {"requests": self.owner.requests()})
        elif path == "/_emulator/usage":
            self._send_json(200, {"billed": self.owner.billed(), "bill_micro": self.owner.bill_micro()})
        elif path == "/v1/models":
            provider = self.owner.catalog.providers.get("anthropic")
            names = sorted(provider.models) if provider is not None else []
            self._send_json(200, {"data": [{"type": "model", "id": m} for m in names], "has_more": False})
        else:
            self._send_error(_ApiError(404, f"no route GET {path}"))

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        split = urlsplit(self.path)
        path, query = split.path, split.query
        raw = self._read_body()
        headers = self._headers_dict()
        if path.startswith("/_emulator/"):
            return self._control(path, raw)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        entry = self._entry(path, query, headers, body, stream=isinstance(body, dict) and body.get("stream") is True)
        speed = body.get("speed") if isinstance(body, dict) else None
        try:
            fault = self.owner._take_fault(path, speed or "standard")
            if fault is not None:
                if fault.hang_s is not None:
                    self.owner._closing.wait(fault.hang_s)
                if fault.status is not None:
                    extra = {"retry-after": fault.retry_after} if fault.retry_after else {}
                    raise _ApiError(fault.status, "injected fault", extra)
            self._check_common(headers, body, raw)
            if path == "/v1/messages":
                return self._messages(entry, body, headers, query)
            if path == "/v1/messages/count_tokens":
                self.owner._validate_messages({**body, "max_tokens": 1}, headers)
                entry["status"] = 200
                self.owner._record(entry)
                return self._send_json(200, {"input_tokens": count_request_tokens(body)})
            if path == "/v1/messages/batches":
                return self._batch(entry, body, headers)
            raise _ApiError(404, f"no route POST {path}")
        except _ApiError as error:
            entry["status"] = error.status
            entry["error"] = error.message
            self.owner._record(entry)
            self._send_error(error)

    def _check_common(self, headers: Mapping[str, str], body: Any, raw: bytes) -> None:
        if self.owner.require_api_key and not (headers.get("x-api-key") or headers.get("authorization")):
            raise _ApiError(401, "x-api-key header is required")
        if "anthropic-version" not in headers:
            raise _ApiError(400, "anthropic-version header is required")
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object" if raw else "a JSON body is required")

    def _control(self, path: str, raw: bytes) -> None:
        try:
            options = json.loads(raw) if raw else {}
            if path == "/_emulator/reset":
                self.owner.reset()
            elif path == "/_emulator/configure":
                self.owner.configure(**options)
            elif path == "/_emulator/faults":
                self.owner.inject(**options)
            else:
                raise _ApiError(404, f"no route POST {path}")
        except (TypeError, ValueError) as exc:
            return self._send_error(_ApiError(400, str(exc)))
        except _ApiError as error:
            return self._send_error(error)
        self._send_json(200, {"ok": True})

    def _batch(self, entry: dict[str, Any], body: dict[str, Any], headers: Mapping[str, str]) -> None:
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            raise _ApiError(400, "requests: at least one request is required")
        for index, item in enumerate(requests):
            try:
                self.owner._validate_messages(item.get("params") if isinstance(item, dict) else None, headers, batch=True)
            except _ApiError as error:
                raise _ApiError(error.status, f"requests.{index}.params.{error.message}") from None
        entry["status"] = 200
        self.owner._record(entry)
        now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self._send_json(200, {
            "id": self.owner._next_id("msgbatch"), "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": len(requests), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
            "ended_at": None, "created_at": now, "expires_at": now, "archived_at": None, "cancel_initiated_at": None,
            "results_url": None,
        })

    def _messages(self, entry: dict[str, Any], body: dict[str, Any], headers: Mapping[str, str], query: str) -> None:
        wanted = headers.get("x-emulator-output-tokens")
        plan = self.owner.plan(body, headers, int(wanted) if wanted and wanted.isdigit() else None)
        entry.update(model=plan.model, speed=plan.speed, status=200)
        otps = self.owner.otps(plan.speed)
        message_id = self.owner._next_id("msg")
        if self.owner.ttft_s:
            self.owner._closing.wait(self.owner.ttft_s)
        if body.get("stream") is True:
            return self._stream(entry, plan, message_id, otps)
        if otps:
            self.owner._closing.wait(plan.output_tokens / otps)
        entry["usage"] = plan.usage
        self.owner._record(entry)
        self._send_json(200, {
            "id": message_id, "type": "message", "role": "assistant", "model": plan.model,
            "content": [{"type": "text", "text": _text_for(plan.output_tokens)}],
            "stop_reason": plan.stop_reason, "stop_sequence": None, "usage": plan.usage,
        }, plan.headers)

    def _stream(self, entry: dict[str, Any], plan: _Plan, message_id: str, otps: float | None) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("request-id", self.owner._next_id("req"))
        for name, value in plan.headers.items():
            self.send_header(name, value)
        self.end_headers()
        start_usage = {k: v for k, v in plan.usage.items() if k != "output_tokens"}
        start_usage["output_tokens"] = 1
        sent = 0
        try:
            self._event("message_start", {"type": "message_start", "message": {
                "id": message_id, "type": "message", "role": "assistant", "model": plan.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
            sent = 1
            self._event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})
            self._event("ping", {"type": "ping"})
            step = max(1, self.owner.delta_tokens)
            done = 0
            while done < plan.output_tokens:
                chunk = min(step, plan.output_tokens - done)
                if otps:
                    self.owner._closing.wait(chunk / otps)
                text = (" " if done else "") + _text_for(chunk, done)
                self._event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": text}})
                done += chunk
                sent = max(sent, done)
            self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
            # Generation is over: the bill is final before the client can see the end of the stream.
            entry["usage"] = plan.usage
            self.owner._record(entry)
            final_usage = {k: plan.usage[k] for k in ("input_tokens", "cache_creation_input_tokens",
                                                      "cache_read_input_tokens", "output_tokens")}
            self._event("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": plan.stop_reason, "stop_sequence": None},
                                          "usage": final_usage})
            self._event("message_stop", {"type": "message_stop"})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
            if entry["usage"] is None:
                # The client went away mid-generation: bill what was generated before it did.
                entry["usage"] = {**plan.usage, "output_tokens": sent}
                entry["abandoned"] = True
                self.owner._record(entry)

    def _event(self, name: str, payload: Mapping[str, Any]) -> None:
        data = f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


@contextlib.contextmanager
def running(**options: Any) -> Iterator[str]:
    """Run an emulator for the duration of a `with` block; yields its base URL."""
    emulator = Emulator(**options)
    emulator.start()
    try:
        yield emulator.url
    finally:
        emulator.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m policy_engine.testing.emulator --port 8765`: serve until interrupted."""
    parser = argparse.ArgumentParser(description="Local Anthropic Messages API emulator (fast mode, budgets, faults).")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--standard-otps", type=float, default=60.0, help="standard output tokens per second")
    parser.add_argument("--fast-input-tpm", type=int, default=10_000_000, help="fast input tokens per minute")
    parser.add_argument("--fast-output-tpm", type=int, default=1_000_000, help="fast output tokens per minute")
    args = parser.parse_args(argv)
    emulator = Emulator(port=args.port, standard_otps=args.standard_otps,
                        fast_input_tokens_per_minute=args.fast_input_tpm,
                        fast_output_tokens_per_minute=args.fast_output_tpm)
    emulator.start()
    print(f"emulator listening on {emulator.url} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
