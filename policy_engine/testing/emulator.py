"""A local emulator of Anthropic's Messages API, for testing policies and integrations offline.

    from policy_engine.testing.emulator import running

    with running(fast_input_tokens_per_minute=6_000) as base_url:
        client = anthropic.Anthropic(base_url=base_url, api_key="test")
        ...

It is a real HTTP server on 127.0.0.1 (stdlib only) that reproduces the documented
behaviour fast mode depends on:

* validation: `speed` must be `fast` or `standard`; `speed: "fast"` needs a model whose
  catalog entry supports fast mode at the time of the request (after a retirement the
  catalog's behaviour: an error, or served and billed at standard), the beta in
  `anthropic-beta` where the catalog says the model needs one (`fast-mode-2026-02-01`),
  and no Priority Tier; the Message Batches API refuses fast requests; `platform=` serves
  another platform's model ids (on Microsoft Foundry, fast is the `-fast` model id and a
  `speed` field is refused);
* fast-mode token buckets (input and output tokens per minute, replenished
  continuously), reported in the six `anthropic-fast-*` headers, and a 429 with
  `retry-after` when a fast request does not fit;
* `usage.speed`, and a prompt cache keyed by speed (a switch of speed misses);
* streaming in Anthropic's SSE event format, fast output `fast_ratio` (2.5) times faster;
* fault injection (any status, e.g. 529 or 500, and hangs), and `GET /_emulator/requests`
  to read back every request received, with what it billed;
* several billed steps per request, as today's API reports them in `usage.iterations`:
  compaction (billed, left out of the top-level usage), advisor sub-inferences and fallback
  hops on other models; server-side `fallbacks` chains (beta `server-side-fallback-2026-07-01`,
  entries validated as the API does, `speed` inherited or set per entry); refusals, with
  `stop_details` and a `fallback_credit_token` under the fallback-credit beta, which a retry
  redeems (the SDK's `BetaRefusalFallbackMiddleware` works against it). What a request does
  is a `Scenario`: the `x-emulator-scenario` header, or `Emulator.script(...)`. Simplifications:
  the fast-mode token buckets count the requested hop only, and a fallback hop reads and writes
  the prompt cache of its own model and speed;
* its own bill (`bill()`, `bill_micro()`): every step it generated, priced by the catalog
  at the step's own model and speed, including what a stream cut short had generated when
  the client went away (or all of it, with `disconnect_billing="complete"`).

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

from ..catalog import FAST_MODE_BETA, PLATFORMS, Catalog, actual, load_catalog

__all__ = ["Emulator", "running", "count_text_tokens", "count_request_tokens", "FAST_BETA", "main"]

FAST_BETA = FAST_MODE_BETA
_TOKEN = re.compile(r"\w+|[^\w\s]")
_MESSAGE_OVERHEAD = 3
_IMAGE_TOKENS = 85
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
}
_OPTIONS = (
    "standard_otps", "fast_ratio", "ttft_s", "output_tokens", "delta_tokens", "fast_input_tokens_per_minute",
    "fast_output_tokens_per_minute", "min_cache_tokens", "priority_tier", "require_api_key", "default_fallbacks",
    "disconnect_billing",
)
SERVER_FALLBACK_BETAS = ("server-side-fallback-2026-07-01", "server-side-fallback-2026-06-01")
"""Betas that enable the `fallbacks` request parameter (server-side fallback), newest first."""
FALLBACK_CREDIT_BETAS = ("fallback-credit-2026-07-01", "fallback-credit-2026-06-09")
"""Betas under which a refusal carries a `fallback_credit_token`."""
_FALLBACK_KEYS = frozenset(("model", "max_tokens", "thinking", "output_config", "speed"))
_CREDIT_TTL_S = 300.0
_REFUSAL_CATEGORIES = ("cyber", "bio", "frontier_llm", "reasoning_extraction", "general_harms")


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


@dataclass(frozen=True)
class Scenario:
    """What a request does beyond a plain answer: refusals, compaction, advisor sub-inferences.

    Given per request in the `x-emulator-scenario` header (a JSON object of these fields) or
    queued for the next requests with `Emulator.script(...)`. Server-side `fallbacks` come
    from the request itself; a scenario only says which models decline.
    """

    refuse: tuple[str, ...] = ()
    """Models that decline the request: the requested one by the name sent, fallback models by theirs;
    "*" is every model. A declined hop hands over to the request's next `fallbacks` entry, if any."""
    refuse_after: int = 0
    """Output tokens a declining model generates before it declines. 0: declined before any output,
    which is not billed; more: that hop is billed (its input and those tokens)."""
    category: str | None = "general_harms"
    """The refusal's policy category (`stop_details.category`, the fallback block's trigger)."""
    compaction: tuple[int, int] | None = None
    """(input, output) tokens of a compaction step, run by the requested model at the request's speed
    before it answers. Billed, and left out of the top-level usage (as the API documents)."""
    advisors: tuple[tuple[str, int, int], ...] = ()
    """(model, input, output) of each advisor sub-inference, billed at the advisor model's standard rates
    and included in the top-level usage."""
    output_tokens: int | None = None
    """Output tokens of the serving hop (capped by its max_tokens); default: the emulator's `output_tokens`."""

    def __post_init__(self) -> None:
        refuse = (self.refuse,) if isinstance(self.refuse, str) else tuple(self.refuse)
        object.__setattr__(self, "refuse", refuse)
        if not all(isinstance(m, str) and m for m in refuse):
            raise ValueError(f"refuse: model names, got {self.refuse!r}")
        if type(self.refuse_after) is not int or self.refuse_after < 0:
            raise ValueError(f"refuse_after: a non-negative int, got {self.refuse_after!r}")
        if self.category is not None and self.category not in _REFUSAL_CATEGORIES:
            raise ValueError(f"category: one of {', '.join(_REFUSAL_CATEGORIES)} or None, got {self.category!r}")
        if self.compaction is not None:
            object.__setattr__(self, "compaction", _counts("compaction", self.compaction, 2))
        advisors = tuple(tuple(a) for a in self.advisors)
        for advisor in advisors:
            if len(advisor) != 3 or not isinstance(advisor[0], str):
                raise ValueError(f"advisors: (model, input_tokens, output_tokens) entries, got {advisor!r}")
            _counts("advisors", advisor[1:], 2)
        object.__setattr__(self, "advisors", advisors)
        if self.output_tokens is not None and (type(self.output_tokens) is not int or self.output_tokens < 1):
            raise ValueError(f"output_tokens: a positive int, got {self.output_tokens!r}")

    def declines(self, model: str) -> bool:
        return "*" in self.refuse or model in self.refuse


def _counts(name: str, values: Any, n: int) -> tuple[int, ...]:
    values = tuple(values)
    if len(values) != n or any(type(v) is not int or v < 0 for v in values):
        raise ValueError(f"{name}: {n} non-negative ints, got {values!r}")
    return values


@dataclass
class _Step:
    """One sampling step of a request, at its own model and speed: what the emulator bills it for."""

    kind: str
    """The `usage.iterations` type: message, compaction, advisor_message or fallback_message."""
    model: str
    speed: str
    input_tokens: int = 0
    output_tokens: int = 0
    write_5m: int = 0
    write_1h: int = 0
    read: int = 0
    declined: bool = False
    """A hop that declined (after `output_tokens` of output)."""
    shown: bool = True
    """Its output is part of the answer (message hops); compaction and advisor steps are not streamed."""

    @property
    def billed(self) -> bool:
        return not (self.declined and self.output_tokens == 0)  # refused before any output: not billed

    def usage(self, output_tokens: int | None = None) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.write_5m + self.write_1h,
            "cache_read_input_tokens": self.read,
            "cache_creation": {"ephemeral_5m_input_tokens": self.write_5m, "ephemeral_1h_input_tokens": self.write_1h},
            "output_tokens": self.output_tokens if output_tokens is None else output_tokens,
        }

    def iteration(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": self.kind, **self.usage()}
        if self.kind != "compaction":
            entry["model"] = self.model
        return entry


@dataclass
class _Plan:
    """How one admitted request will be answered."""

    model: str
    speed: str
    usage: dict[str, Any]
    output_tokens: int
    stop_reason: str
    headers: dict[str, str] = field(default_factory=dict)
    steps: list[_Step] = field(default_factory=list)
    """Every step in the order it runs; the billed ones are the request's bill."""
    stop_details: dict[str, Any] | None = None
    category: str | None = None


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
        platform: str = "claude_api",
        default_fallbacks: tuple[str, ...] = (),
        disconnect_billing: str = "generated",
    ) -> None:
        self.catalog = catalog or load_catalog()
        self.platform = platform
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
        self.default_fallbacks = tuple(default_fallbacks)
        """The models `fallbacks: "default"` tries, in order (none: the requested model alone)."""
        if disconnect_billing not in ("generated", "complete"):
            raise ValueError(f"disconnect_billing must be 'generated' or 'complete', got {disconnect_billing!r}")
        self.disconnect_billing = disconnect_billing
        """A stream the client leaves early bills what was `generated` until then, or the `complete` answer
        (a server that finishes generating anyway)."""
        self._scripts: list[list[Any]] = []
        self._credits: dict[str, float] = {}
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
            self._scripts.clear()
            self._credits.clear()

    def inject(self, status: int | None = 529, *, times: int = 1, hang_s: float | None = None, speed: str | None = None,
               path: str = "/v1/messages", retry_after: str | None = None) -> None:
        """Answer the next `times` matching requests with `status` (after hanging `hang_s` seconds).

        `status=None` with `hang_s` hangs and then answers normally. `speed` restricts the
        fault to requests at that speed; `path` to that endpoint.
        """
        with self._lock:
            self._faults.append(_Fault(status, times, hang_s, speed, path, retry_after))

    def script(self, times: int = 1, **scenario: Any) -> None:
        """Have the next `times` Messages requests follow a `Scenario` (its fields as keywords), e.g.
        `emulator.script(refuse=["claude-opus-4-6"], refuse_after=20)`. A request's own
        `x-emulator-scenario` header takes precedence."""
        plan = Scenario(**scenario)
        with self._lock:
            self._scripts.append([plan, times])

    def _next_scenario(self) -> Scenario | None:
        with self._lock:
            if not self._scripts:
                return None
            head = self._scripts[0]
            head[1] -= 1
            if head[1] <= 0:
                self._scripts.pop(0)
            return head[0]

    def requests(self) -> list[dict[str, Any]]:
        """Every request received so far (API key redacted), with status, speed and billed usage."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def billed(self) -> list[dict[str, Any]]:
        """The usage of every request that was served (and so billed), in order."""
        return [dict(e["usage"], model=e["model"]) for e in self.requests() if e.get("usage") is not None]

    def bill(self) -> list[dict[str, Any]]:
        """Every billed step of every request, in order: {"request", "type", "model", "speed", "usage"}.

        One step per plain request; several for compaction, advisor sub-inferences, declined hops that
        had generated output, and the fallback hop that served. A stream cut short bills what was
        generated before the client went away (`disconnect_billing`)."""
        out = []
        for number, entry in enumerate(self.requests()):
            for step in entry.get("steps") or ():
                out.append({"request": number, **step})
        return out

    def bill_micro(self) -> int:
        """The emulator's own bill, in micro-dollars: every step it billed, priced by its catalog at the
        step's own model and speed (and the request's inference geo), cache multipliers included.

        Independent of any ledger: what the client was charged, to compare a ledger with. Raises
        `PricingError` for a model the catalog does not price: give the emulator a catalog that does."""
        return sum(actual(self.catalog.model(step["model"], platform=self.platform), {**step["usage"], "speed": step["speed"],
                                                               "inference_geo": step.get("inference_geo")})
                   for step in self.bill())

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
        entry = self.catalog.find(model, platform=self.platform)
        if entry is None:
            raise _ApiError(404, f"model: {model}")
        speed = params.get("speed", "standard")
        if speed is None:
            speed = "standard"
        if speed not in ("standard", "fast"):
            raise _ApiError(400, f"speed: Input should be 'standard' or 'fast', got {speed!r}")
        if entry.fast_model_id is not None and "speed" in params:
            raise _ApiError(400, f"speed: not supported on {self.platform}; send fast requests to {entry.fast_model_id}")
        if model == entry.fast_model_id:
            speed = "fast"  # the deployment sets the speed
        if speed == "fast":
            if batch:
                raise _ApiError(400, "speed: fast mode is not available with the Batch API")
            speed = self._fast_speed(entry, model, headers, "speed")
            tier = params.get("service_tier") or "auto"
            if speed == "fast" and (tier == "priority" or (self.priority_tier and tier == "auto")):
                raise _ApiError(400, "speed: fast mode is not available with Priority Tier")
        return model, speed

    def _fast_speed(self, entry: Any, model: str, headers: Mapping[str, str], where: str) -> str:
        """The speed a fast request to `entry` runs at (`standard` once its fast mode is retired that way),
        or the API's 400: no fast mode, not yet or no longer available, the beta header missing."""
        if not entry.fast.supported:
            raise _ApiError(400, f"{where}: fast mode is not supported for model {model}")
        state, why = entry.fast.status(time.time())
        if state in ("not_yet", "retired_error"):
            raise _ApiError(400, f"{where}: {why}")
        beta = entry.fast.beta_header
        if beta is not None and entry.fast_model_id is None and not _has_beta(headers, (beta,)):
            raise _ApiError(400, f"{where}: 'fast' requires the anthropic-beta header {beta}")
        return "standard" if state == "retired_standard" else "fast"

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

    def plan(self, params: dict[str, Any], headers: Mapping[str, str], output_tokens: int | None = None,
             scenario: Scenario | None = None) -> _Plan:
        """Validate a Messages request and decide its steps and usage (raises `_ApiError` with the API's status)."""
        model, speed = self._validate_messages(params, headers)
        scenario = scenario or Scenario()
        chain = self._chain(params, headers, model, speed)
        now = time.time()
        wanted = scenario.output_tokens or (self.output_tokens if output_tokens is None else output_tokens)
        steps: list[_Step] = []
        if scenario.compaction is not None:
            steps.append(_Step("compaction", model, speed, scenario.compaction[0], scenario.compaction[1], shown=False))
        extra: dict[str, str] = {}
        served: _Step | None = None
        stop = "refusal"
        for index, (hop_model, hop_speed, hop_max) in enumerate(chain):
            declines = scenario.declines(hop_model)
            if declines and scenario.refuse_after == 0:
                steps.append(_Step("message", hop_model, hop_speed, declined=True))
                if index == 0 and speed == "fast":
                    extra = self._admit_fast(self._account(headers), count_request_tokens(params), 0, now)
                continue
            out = min(hop_max, scenario.refuse_after) if declines else max(1, min(hop_max, wanted))
            uncached, write_5m, write_1h, read = self._cache_usage(params, hop_model, hop_speed, now)
            if index == 0 and speed == "fast":
                extra = self._admit_fast(self._account(headers), uncached + write_5m + write_1h, out, now)
            kind = "message" if index == 0 or declines else "fallback_message"
            step = _Step(kind, hop_model, hop_speed, uncached, out, write_5m, write_1h, read, declined=declines)
            if not declines:
                for advisor, a_in, a_out in scenario.advisors:
                    if self.catalog.find(advisor, platform=self.platform) is None:
                        raise _ApiError(400, f"advisor model: {advisor} is not a model")
                    steps.append(_Step("advisor_message", advisor, "standard", a_in, a_out, shown=False))
                served, stop = step, "max_tokens" if wanted > hop_max else "end_turn"
            steps.append(step)
            if served is not None:
                break
        credit = self._redeem(params, served)
        billed = [st for st in steps if st.billed]
        usage = _top_level_usage(billed)
        usage["speed"] = served.speed if served is not None else speed
        if params.get("inference_geo"):
            usage["inference_geo"] = params["inference_geo"]
        if params.get("fallbacks") is not None or scenario.refuse or scenario.compaction or scenario.advisors:
            usage["iterations"] = [st.iteration() for st in billed]
        if credit is not None:
            usage["fallback_credit"] = credit
        details = None if served is not None else self._refusal(headers, scenario.category, now)
        return _Plan(served.model if served is not None else model, usage["speed"], usage,
                     served.output_tokens if served is not None else 0, stop, extra, steps, details, scenario.category)

    def _chain(self, params: Mapping[str, Any], headers: Mapping[str, str], model: str, speed: str) -> list[tuple[str, str, int]]:
        """(model, speed, max_tokens) of the requested model and of each `fallbacks` entry, validated."""
        chain = [(model, speed, params["max_tokens"])]
        fallbacks = params.get("fallbacks")
        if fallbacks is None:
            return chain
        if not _has_beta(headers, SERVER_FALLBACK_BETAS):
            raise _ApiError(400, f"fallbacks: requires the anthropic-beta header {SERVER_FALLBACK_BETAS[0]}")
        if fallbacks == "default":
            fallbacks = [{"model": m} for m in self.default_fallbacks]
        if not isinstance(fallbacks, list):
            raise _ApiError(400, "fallbacks: must be a list of fallback entries or \"default\"")
        for index, entry in enumerate(fallbacks):
            at = f"fallbacks.{index}"
            if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
                raise _ApiError(400, f"{at}.model: Field required")
            unknown = sorted(set(entry) - _FALLBACK_KEYS)
            if unknown:
                raise _ApiError(400, f"{at}.{unknown[0]}: Extra inputs are not permitted")
            found = self.catalog.find(entry["model"], platform=self.platform)
            if found is None:
                raise _ApiError(400, f"{at}.model: {entry['model']} is not a model")
            max_tokens = entry.get("max_tokens")
            if max_tokens is None:
                max_tokens = params["max_tokens"]
            elif type(max_tokens) is not int or max_tokens < 1:
                raise _ApiError(400, f"{at}.max_tokens: must be a positive integer")
            if "speed" not in entry:  # inherited: fast only where the request is fast and the model has fast mode now
                hop_speed = ("fast" if speed == "fast" and found.fast.supported
                             and found.fast.status(time.time())[0] == "available" else "standard")
            else:
                hop_speed = entry["speed"] or "standard"
                if hop_speed not in ("standard", "fast"):
                    raise _ApiError(400, f"{at}.speed: Input should be 'standard' or 'fast', got {hop_speed!r}")
                if hop_speed == "fast":
                    hop_speed = self._fast_speed(found, entry["model"], headers, f"{at}.speed")
            chain.append((entry["model"], hop_speed, max_tokens))
        return chain

    def _refusal(self, headers: Mapping[str, str], category: str | None, now: float) -> dict[str, Any]:
        """`stop_details` of a request every hop declined; under the fallback-credit beta, with a token to redeem."""
        details: dict[str, Any] = {"type": "refusal", "category": category, "explanation": "declined by the emulator's scenario",
                                   "fallback_credit_token": None, "fallback_has_prefill_claim": None, "recommended_model": None}
        if _has_beta(headers, FALLBACK_CREDIT_BETAS):
            token = self._next_id("fct")
            with self._lock:
                self._credits[token] = now + _CREDIT_TTL_S
            details.update(fallback_credit_token=token, fallback_has_prefill_claim=False)
        return details

    def _redeem(self, params: Mapping[str, Any], served: _Step | None) -> dict[str, Any] | None:
        """`usage.fallback_credit` for a request carrying a `fallback_credit_token` (None without one).

        A redeemed token bills the retry as if the conversation had been on its model all along:
        the prompt it would write to the cache again is billed as cache reads instead."""
        raw = params.get("fallback_credit_token")
        if raw is None:
            return None
        token, mode = (raw.get("token"), raw.get("mode", "strict")) if isinstance(raw, dict) else (raw, "strict")
        with self._lock:
            live = self._credits.pop(token, 0.0) > time.time() if isinstance(token, str) else False
        if not live:
            if mode != "best_effort":
                raise _ApiError(400, "fallback_credit_token: expired or unknown")
            return {"status": {"type": "not_applied", "reason": "expired"}}
        if served is not None:
            served.read += served.write_5m + served.write_1h
            served.write_5m = served.write_1h = 0
        return {"status": {"type": "redeemed"}}

    @staticmethod
    def _account(headers: Mapping[str, str]) -> str:
        return hashlib.sha256((headers.get("x-api-key") or headers.get("authorization") or "").encode()).hexdigest()

    def otps(self, speed: str) -> float | None:
        if not self.standard_otps:
            return None
        return self.standard_otps * (self.fast_ratio if speed == "fast" else 1.0)

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._log.append(entry)

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}_emu{next(self._ids):012x}"


def _top_level_usage(billed: list[_Step]) -> dict[str, Any]:
    """The response's `usage`: the sums of its billed steps, compaction left out (as the API documents:
    "A `compaction` entry's tokens are not included in the top-level `usage` fields")."""
    usage: dict[str, Any] = {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                             "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                             "output_tokens": 0}
    for step in billed:
        if step.kind == "compaction":
            continue
        for name, value in step.usage().items():
            if name == "cache_creation":
                for ttl, n in value.items():
                    usage["cache_creation"][ttl] += n
            else:
                usage[name] += value
    usage["service_tier"] = "standard"
    return usage


def _has_beta(headers: Mapping[str, str], betas: tuple[str, ...]) -> bool:
    given = {b.strip() for b in headers.get("anthropic-beta", "").split(",")}
    return any(b in given for b in betas)


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
        scenario = self._scenario(headers.get("x-emulator-scenario"))
        plan = self.owner.plan(body, headers, int(wanted) if wanted and wanted.isdigit() else None, scenario)
        entry.update(model=plan.model, speed=plan.speed, status=200)
        message_id = self.owner._next_id("msg")
        if self.owner.ttft_s:
            self.owner._closing.wait(self.owner.ttft_s)
        if body.get("stream") is True:
            return self._stream(entry, body, plan, message_id)
        for step in plan.steps:
            otps = self.owner.otps(step.speed)
            if otps and step.shown:
                self.owner._closing.wait(step.output_tokens / otps)
        entry["usage"], entry["steps"] = plan.usage, _bill_steps(plan, body)
        self.owner._record(entry)
        payload = {
            "id": message_id, "type": "message", "role": "assistant", "model": plan.model,
            "content": _content(plan, body["model"]), "stop_reason": plan.stop_reason, "stop_sequence": None,
            "usage": plan.usage,
        }
        if plan.stop_details is not None:
            payload["stop_details"] = plan.stop_details
        self._send_json(200, payload, plan.headers)

    def _scenario(self, raw: str | None) -> Scenario | None:
        if raw is None:
            return self.owner._next_scenario()
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("a JSON object of Scenario fields")
            return Scenario(**data)
        except (TypeError, ValueError) as exc:
            raise _ApiError(400, f"x-emulator-scenario: {exc}") from None

    def _stream(self, entry: dict[str, Any], body: Mapping[str, Any], plan: _Plan, message_id: str) -> None:
        start_usage = {k: v for k, v in plan.usage.items() if k not in ("output_tokens", "iterations", "fallback_credit")}
        start_usage["output_tokens"] = 1
        generated: dict[int, int] = {}  # step index -> output tokens generated so far: the bill if the client leaves
        # The prompt is read before the first byte goes out (message_start reports its tokens): a client gone
        # by then, even before the headers (a hang past its timeout), is billed the first hop's input and
        # whatever ran before it.
        for number, step in enumerate(plan.steps):
            generated[number] = 0 if step.shown else step.output_tokens
            if step.shown:
                break
        try:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("request-id", self.owner._next_id("req"))
            for name, value in plan.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self._event("message_start", {"type": "message_start", "message": {
                "id": message_id, "type": "message", "role": "assistant", "model": body["model"], "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
            index = 0
            for number, step in enumerate(plan.steps):
                if not step.shown:
                    generated[number] = step.output_tokens  # compaction and advisor steps run whole, unseen
                    continue
                generated[number] = 0
                if step.output_tokens:
                    self._stream_text(index, step, generated, number)
                    index += 1
                if step.declined:
                    following = next((st.model for st in plan.steps[number + 1:] if st.shown), None)
                    if following is not None:
                        block = _fallback_block(body["model"] if number == _first_hop(plan) else step.model, following,
                                                plan.category)
                        self._event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
                        self._event("content_block_stop", {"type": "content_block_stop", "index": index})
                        index += 1
            # Generation is over: the bill is final before the client can see the end of the stream.
            entry["usage"], entry["steps"] = plan.usage, _bill_steps(plan, body)
            self.owner._record(entry)
            final_usage = {k: plan.usage[k] for k in ("input_tokens", "cache_creation_input_tokens",
                                                      "cache_read_input_tokens", "output_tokens")}
            for name in ("iterations", "fallback_credit"):
                if name in plan.usage:
                    final_usage[name] = plan.usage[name]  # streams carry them on the final message_delta
            delta: dict[str, Any] = {"stop_reason": plan.stop_reason, "stop_sequence": None}
            if plan.stop_details is not None:
                delta["stop_details"] = plan.stop_details
            self._event("message_delta", {"type": "message_delta", "delta": delta, "usage": final_usage})
            self._event("message_stop", {"type": "message_stop"})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
            if entry["usage"] is None:
                # The client went away mid-generation: bill what was generated before it did (or all of it,
                # for a server that finishes anyway).
                progress = None if self.owner.disconnect_billing == "complete" else generated
                entry["steps"] = _bill_steps(plan, body, progress)
                shown = sum(s["usage"]["output_tokens"] for s in entry["steps"] if s["type"] != "compaction")
                entry["usage"] = {**plan.usage, "output_tokens": shown}
                entry["abandoned"] = True
                self.owner._record(entry)

    def _stream_text(self, index: int, step: _Step, generated: dict[int, int], number: int) -> None:
        otps = self.owner.otps(step.speed)
        self._event("content_block_start", {"type": "content_block_start", "index": index,
                                            "content_block": {"type": "text", "text": ""}})
        self._event("ping", {"type": "ping"})
        size = max(1, self.owner.delta_tokens)
        done = 0
        while done < step.output_tokens:
            chunk = min(size, step.output_tokens - done)
            if otps:
                self.owner._closing.wait(chunk / otps)
            done += chunk
            generated[number] = done  # generated before it is written: a failed write still bills it
            text = (" " if done > chunk else "") + _text_for(chunk, done - chunk)
            self._event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                "delta": {"type": "text_delta", "text": text}})
        self._event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _event(self, name: str, payload: Mapping[str, Any]) -> None:
        data = f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _first_hop(plan: _Plan) -> int:
    """Index of the requested model's hop in `plan.steps` (after a compaction step, if any)."""
    return 1 if plan.steps and plan.steps[0].kind == "compaction" else 0


def _fallback_block(from_model: str, to_model: str, category: str | None) -> dict[str, Any]:
    return {"type": "fallback", "from": {"model": from_model}, "to": {"model": to_model},
            "trigger": {"type": "refusal", "category": category}}


def _content(plan: _Plan, requested: str) -> list[dict[str, Any]]:
    """A whole answer's content: each declined hop's partial text and its fallback block, then the serving hop's text."""
    content: list[dict[str, Any]] = []
    hops = [(n, st) for n, st in enumerate(plan.steps) if st.shown]
    for position, (number, step) in enumerate(hops):
        if step.output_tokens:
            content.append({"type": "text", "text": _text_for(step.output_tokens)})
        if step.declined and position + 1 < len(hops):
            source = requested if number == _first_hop(plan) else step.model
            content.append(_fallback_block(source, hops[position + 1][1].model, plan.category))
    return content


def _bill_steps(plan: _Plan, body: Mapping[str, Any], progress: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """The billed steps of a request: all of them, or (`progress`: step index -> output generated) those
    reached before the client left, each with the output it had generated."""
    out = []
    for number, step in enumerate(plan.steps):
        tokens = step.output_tokens if progress is None else progress.get(number)
        if tokens is None or not step.billed:
            continue
        out.append({"type": step.kind, "model": step.model, "speed": step.speed, "usage": step.usage(tokens),
                    "inference_geo": body.get("inference_geo")})
    return out


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
    parser.add_argument("--platform", default="claude_api", choices=PLATFORMS,
                        help="whose model ids and fast mode to serve (default: the Claude API)")
    args = parser.parse_args(argv)
    emulator = Emulator(port=args.port, standard_otps=args.standard_otps,
                        fast_input_tokens_per_minute=args.fast_input_tpm,
                        fast_output_tokens_per_minute=args.fast_output_tpm, platform=args.platform)
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
