"""One logical request's life, written once for every integration: the SDK middleware, the httpx
transports and the proxy.

A *flight* is one logical Messages API request: decided once (one reservation), sent
one or more times (SDK retries, a fallback to standard after a fast 429, `retry`
waits), and settled once (from the body, or from the stream's `message_start` plus its
final `message_delta`), or released when it ends without a response the API bills.

`exchange` is that life as a generator that performs no I/O (as h11 and httpcore keep the
protocol apart from the sockets): it yields what it needs done, `SEND` an attempt, `DISCARD`
a response it will not hand back, `READ` a body, `SLEEP`, `CALL` the ledger, and is resumed
with the result (or the exception, thrown in). `drive` performs those steps with blocking
calls, `adrive` with awaits; an integration supplies its `Wire` (how to build its request
and read its response, no I/O) and its three I/O functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from typing import Any, Final, Literal, Protocol

from .. import telemetry
from .._fork import renew_in_child
from .._threads import in_background, run_in_thread
from ..apply import apply_params, merge_beta
from ..catalog import UsageError
from ..decide import Decision, Engine, Settlement
from ..decisionlog import Observed
from ..errors import InvalidContext, InvalidRequest, PolicyEngineError
from ..ledger import AsyncLedger, MemoryLedger
from ..observe import ThroughputObserver
from ..ratelimit import account_id, parse_retry_after
from ..tokens import estimate_text_tokens

__all__ = ["Runtime", "Flight", "StreamTracker", "FastModeRateLimited", "UpstreamUnanswered", "policy_context", "ContextSource", "Wire",
           "exchange", "drive", "adrive", "body_usage"]

ContextSource = Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any] | None] | None
Action = Literal["done", "fallback", "retry", "fail"]

_MESSAGES: Final = "/v1/messages"
_BATCHES: Final = "/v1/messages/batches"
_context: Final[contextvars.ContextVar[Mapping[str, Any] | None]] = contextvars.ContextVar("policy_engine_context", default=None)


class FastModeRateLimited(PolicyEngineError):
    """A fast request got a 429 and the policy's `on_fast_rate_limited` is `fail`."""

    def __init__(self, retry_after_s: float | None, decision: Decision) -> None:
        self.retry_after_s = retry_after_s
        self.decision = decision
        wait = f"; retry after {retry_after_s:g}s" if retry_after_s is not None else ""
        super().__init__(f"fast mode is rate limited (HTTP 429){wait}; the policy says fail (on_fast_rate_limited)")


class UpstreamUnanswered(Exception):
    """A 5xx without the header every answer of the platform's API carries (Anthropic's `request-id`;
    Bedrock's `x-amzn-requestid`): it came from something in between (a load balancer, a gateway, a CDN's
    502, 504 or 524), and the request may well have reached the API, which goes on and bills it. The life
    cycle ends the attempt with this, as it would with a read timeout, instead of releasing it as an error
    of the API's own. (Vertex AI's answers carry no such header: its 5xx are counted so too.)"""

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status} without a request-id: not an answer of the API")
        self.status = status
        self.headers = headers


def unanswered(status: int, headers: Mapping[str, str], platform: str) -> UpstreamUnanswered | None:
    """The failure a non-2xx response stands for, when it may not be `platform`'s API's own answer."""
    if status >= 500 and not any(headers.get(name) is not None for name in _ANSWERED_BY.get(platform, _ANTHROPIC)):
        return UpstreamUnanswered(status, headers)
    return None


_ANTHROPIC: Final = ("request-id",)
_ANSWERED_BY: Final = {"bedrock": ("request-id", "x-amzn-requestid")}
"""Headers a response of the platform's API itself carries: Anthropic's `request-id` everywhere, and on
Bedrock its `x-amzn-requestid` (its 503s under load are its own, refused before any output). Anywhere else
`x-amzn-requestid` proves nothing: AWS API Gateway and Lambda URLs put it on their own errors, such as API
Gateway's 504 after its 29 s integration timeout while the API goes on generating."""


@contextlib.contextmanager
def policy_context(**context: Any) -> Iterator[None]:
    """Decision context for the requests made inside the block (merged over the integration's own).

        with policy_context(tenant="acme", interactive=True, latency_slo_ms=8_000):
            client.messages.create(...)

    Works across threads' and tasks' boundaries the way `contextvars` do.
    """
    outer = _context.get()
    token = _context.set({**outer, **context} if outer else context)
    try:
        yield
    finally:
        _context.reset(token)


def endpoint(url: str) -> str | None:
    """`messages`, `batches`, or None (any other endpoint, count_tokens included)."""
    path = url.split("?", 1)[0]
    if path.endswith(_MESSAGES):
        return "messages"
    if path.endswith(_BATCHES):
        return "batches"
    return None


def strip_batch_speed(body: Any) -> Any:
    """A batch body whose requests never ask for fast mode (the Batch API refuses it)."""
    requests = body.get("requests") if isinstance(body, Mapping) else None
    if not isinstance(requests, list):
        return body
    if not any(isinstance(r, Mapping) and isinstance(r.get("params"), Mapping) and "speed" in r["params"] for r in requests):
        return body
    telemetry.record_event("policy_engine.batch_speed_removed", {})
    stripped = []
    for item in requests:
        if isinstance(item, Mapping) and isinstance(item.get("params"), Mapping) and "speed" in item["params"]:
            item = {**item, "params": {k: v for k, v in item["params"].items() if k != "speed"}}
        stripped.append(item)
    return {**body, "requests": stripped}


def sdk_will_retry(status: int, headers: Mapping[str, str], retries_taken: int, max_retries: int) -> bool:
    """Whether the anthropic SDK's retry loop will send this request again (its own rules)."""
    if retries_taken >= max_retries:
        return False
    should = headers.get("x-should-retry")
    if should == "true":
        return True
    if should == "false":
        return False
    return status in (408, 409, 429) or status >= 500


class Flight:
    """One logical request between its decision and its settlement."""

    # A plain class with slots: one is made per request, and a dataclass with a
    # default factory costs several times more to build.
    __slots__ = ("decision", "speed", "key", "created", "sent_at", "fast_retries", "done")

    def __init__(self, decision: Decision, speed: str, key: str | None, created: float) -> None:
        self.decision = decision
        self.speed = speed
        """The speed on the wire now: the decision's, or standard after a fallback."""
        self.key = key
        self.created = created
        self.sent_at = 0.0
        self.fast_retries = 0
        self.done = False


class Runtime:
    """Decides, rewrites, records and settles for one integration instance."""

    def __init__(
        self,
        engine: Engine,
        *,
        context: ContextSource = None,
        policy: str | None = None,
        account: str | None = None,
        observe: bool = True,
        fast_retries: int = 2,
        max_retry_wait_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        platform: str | None = None,
    ) -> None:
        if isinstance(engine.ledger, AsyncLedger):
            # Streams settle and failed attempts release from synchronous code paths too.
            raise TypeError(
                f"the SDK middleware and httpx transports need an Engine with a synchronous ledger, not "
                f"{type(engine.ledger).__name__}: use RedisLedger (async clients run its calls in a worker thread), "
                f"or call engine.adecide/asettle yourself around each request")
        self.engine = engine
        self.offload = not isinstance(engine.ledger, MemoryLedger)
        """Async callers run the engine's calls on a worker thread: a shared ledger does I/O of its own, which
        must not hold an event loop (a stream's settlement and an error's release too)."""
        self.context = context
        self.policy = policy
        self.platform = platform or engine.platform
        """The platform decisions are made for: prices and fast availability are that platform's."""
        self.fixed_account = account
        self.account = account or "default"
        if observe and engine.throughput is None:
            engine.throughput = ThroughputObserver()
        self.observer = engine.throughput if observe else None
        self.fast_retries = fast_retries
        self.max_retry_wait_s = max_retry_wait_s
        self.sleep = sleep
        self._flights: dict[str, Flight] = {}
        self._lock = threading.Lock()
        self._renewal: object = renew_in_child(self._renew_after_fork)
        self._accounts: dict[str, str] = {}
        self._model_keys: dict[str, str] = {}
        self._merged_betas: dict[tuple[str | None, str], str] = {}
        self._next_sweep = 0.0

    def _renew_after_fork(self) -> None:
        # In a forked child: the parent's attempts in flight are not the child's to finish.
        self._lock = threading.Lock()
        self._flights = {}

    # -- deciding ----------------------------------------------------------------------

    def _context_for(self, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
        source = self.context
        base = source(body) if callable(source) else source
        extra = _context.get()
        if extra is None:
            return base
        return {**base, **extra} if base else extra

    def flight(self, body: Mapping[str, Any], betas: str | None, key: str | None,
               account: str | None = None) -> Flight | None:
        """The flight of this attempt: the one already decided for `key`, else a new decision.

        `account`: the rate-limit account the request is sent with, when the caller knows it before
        deciding (the proxy, serving many API keys); otherwise the last one a response showed.

        Raises `CeilingExceeded`, or `InvalidContext` under `on_invalid_context: reject` (nothing is
        sent). Returns None for a body the engine cannot read; such a request goes out at standard speed, unmetered, and the API
        will most likely refuse it anyway.
        """
        if key is not None:
            model = body.get("model")
            if model is not None:
                # One idempotency key can carry several hops (the SDK's BetaRefusalFallbackMiddleware resends it
                # to each fallback model): each model's hop is a flight of its own, decided and settled alone.
                key = f"{key}\x1f{model}"
            existing = self._flights.get(key)
            if existing is not None:
                return existing
        params: Mapping[str, Any] = body
        if betas:
            params = {**body, "betas": [b.strip() for b in betas.split(",") if b.strip()]}
        try:
            decision = self.engine.decide(params, self._context_for(body), account=account or self.account, policy=self.policy,
                                          platform=self.platform)
        except InvalidContext:
            raise  # the policy's on_invalid_context is reject: nothing is sent
        except InvalidRequest as exc:
            # Only what was wrong, never the value given: it may be a tenant's or a user's id.
            telemetry.record_event("policy_engine.undecidable_request", {
                "policy_engine.error": exc.redacted[:200], "policy_engine.error.type": type(exc).__name__})
            return None
        now = time.monotonic()
        if self.engine.decision_log is not None:
            decision._observed = Observed()
        flight = Flight(decision, decision.speed, key, now)
        if key is not None:
            with self._lock:
                self._flights[key] = flight
                if now >= self._next_sweep:
                    self._sweep(now)
        return flight

    def _sweep(self, now: float) -> None:
        # A flight whose caller vanished (no final response, no exception) is dropped; its
        # reservation expires in the ledger on its own.
        self._next_sweep = now + 60.0
        ttl = self.engine.reservation_ttl_s
        for key in [k for k, f in self._flights.items() if now - f.created > ttl]:
            flight = self._flights.pop(key)
            if self.engine.decision_log is not None and not flight.decision._settled:
                self.engine._log_end("released", flight.decision)  # its reservation has expired in the ledger

    def wire_body(self, flight: Flight | None, body: Mapping[str, Any]) -> dict[str, Any]:
        """The body to send: `speed: "fast"` for fast, no `speed` at all otherwise (on a platform that
        asks for fast mode by model id, the fast or the standard model's id instead)."""
        if flight is not None:
            decision = flight.decision
            if decision._chain is not None:
                body = _wire_chain(body, decision._wire_fallbacks, flight.speed != decision.speed)
            models = flight.decision._wire_models()
            if models is not None:
                return apply_params(body, flight.speed, None, models)
            if flight.speed == "fast":
                return {**body, "speed": "fast"}
        if "speed" in body:
            return {k: v for k, v in body.items() if k != "speed"}
        return body if isinstance(body, dict) else dict(body)

    def wire_beta(self, flight: Flight | None, current: str | None) -> str | None:
        """The `anthropic-beta` value to send (the caller's, plus the fast beta when fast)."""
        beta = None if flight is None or flight.speed != "fast" else flight.decision.fast_beta
        if beta is None:
            return current
        merged = self._merged_betas.get((current, beta))
        if merged is None:
            merged = merge_beta(current, beta)
            if len(self._merged_betas) >= 256:
                self._merged_betas.clear()  # header values come from callers: keep the cache bounded
            self._merged_betas[(current, beta)] = merged
        return merged

    # -- responses ---------------------------------------------------------------------

    def account_from(self, credential: str | None) -> str:
        """The rate-limit account of a request: its API key (or `Authorization` value), hashed once."""
        if self.fixed_account is not None:
            return self.fixed_account
        key = credential or ""
        account = self._accounts.get(key)
        if account is None:
            secret = key[7:] if key[:7].lower() == "bearer " else key  # the same account either way it is sent
            if len(self._accounts) >= _ACCOUNTS_KEPT:
                self._accounts.clear()  # credentials come from clients (a proxy's, any): keep the cache bounded
            account = self._accounts[key] = account_id(api_key=secret or None)
        # Decisions are made before the request has auth headers: they use the last account seen.
        self.account = account
        return account

    def after_response(self, flight: Flight | None, status: int, headers: Mapping[str, str],
                       credential: str | None) -> tuple[Action, float]:
        """Record the fast rate-limit headers; say what to do next and how long to wait first.

        `credential`: the API key the request was sent with, which keys the rate-limit state.
        """
        fast_429 = flight is not None and flight.speed == "fast" and status == 429
        account = self.account_from(credential)
        self.engine.ratelimits.record(account, headers, rate_limited=fast_429)
        observed = flight.decision._observed if flight is not None else None
        if observed is not None:
            observed.account = account
        if not fast_429:
            if observed is not None:
                observed.attempt(flight.speed, status, headers, "done")  # type: ignore[union-attr]
            return "done", 0.0
        assert flight is not None
        mode = self.engine.policy(self.policy).policy.on_fast_rate_limited
        wait = parse_retry_after(headers.get("retry-after"), time.time())
        attributes = {"policy_engine.policy.name": flight.decision.policy_name, "policy_engine.action": mode}
        telemetry.record_event("policy_engine.fast_rate_limited", attributes)
        action, delay = self._on_fast_429(flight, mode, wait)
        if observed is not None:
            observed.attempt("fast", status, headers, action, delay)
        return action, delay

    def _on_fast_429(self, flight: Flight, mode: str, wait: float | None) -> tuple[Action, float]:
        if mode == "fallback":
            flight.speed = "standard"
            flight.decision._sent_standard()
            return "fallback", 0.0
        if mode == "retry" and flight.fast_retries < self.fast_retries:
            flight.fast_retries += 1
            return "retry", min(wait if wait is not None else 1.0, self.max_retry_wait_s)
        if mode == "retry":
            return "done", 0.0  # out of retries: the 429 goes to the caller (and the SDK's own retries)
        return "fail", wait if wait is not None else 0.0

    def fail(self, flight: Flight, wait: float) -> FastModeRateLimited:
        self.release(flight)
        return FastModeRateLimited(wait or None, flight.decision)

    # -- settling ----------------------------------------------------------------------

    def _finish(self, flight: Flight) -> bool:
        with self._lock:
            if flight.done:
                return False
            flight.done = True
            key = flight.key
            if key is not None and self._flights.get(key) is flight:
                del self._flights[key]
        return True

    def release(self, flight: Flight | None) -> None:
        """The request ended without a billed response: free its reservation."""
        if flight is not None and self._finish(flight):
            self.engine.release(flight.decision)

    def unclaimed(self, flight: Flight | None) -> None:
        """The flight of a caller cancelled while it was being decided: released if it was never sent; a retry's
        flight, sent before, ends as any cancelled attempt does (at the worst case)."""
        self.abandon(flight, asyncio.CancelledError())

    def abandon(self, flight: Flight | None, exc: BaseException, *, retried: bool = False,
                answered: bool = False) -> None:
        """An attempt ended by `exc`: if the server cannot have billed it (it never got the request), the
        reservation is released, unless the attempt is `retried`; else it is settled as an incomplete response
        (a read timeout: the server may still be generating), or, when retried, charged beside the reservation
        the next attempt settles (under `worst_case`). `answered`: a success status came, so it is billed
        whatever `exc` is (a body that cannot be decoded, say)."""
        if flight is None:
            return
        observed = flight.decision._observed
        if observed is not None and not isinstance(exc, UpstreamUnanswered):  # (its status is recorded)
            observed.attempt(flight.speed, None, None, "error")
        if not (answered or (flight.sent_at and _may_be_billed(exc))):
            if not retried:
                self.release(flight)
            return
        if not retried:
            self.settle_incomplete(flight, None, 0)
            return
        decision = flight.decision
        if self._incomplete_rule(decision) == "worst_case" and not flight.done:
            self.engine.charge_attempt(decision, _worst_case_usage(flight), worst_case=True)

    def unread(self, flight: Flight, exc: BaseException) -> None:
        """A success status came, and its body could not be read: billed, perhaps in full."""
        self.abandon(flight, exc, answered=True)

    def settle_incomplete(self, flight: Flight, usage: Mapping[str, Any] | None, seen: int) -> None:
        """Settle a response that ended without its final usage, by the policy's `on_incomplete_stream`:
        `worst_case` charges max_tokens of output (what the server may have billed), `observed` what the client read.

        `usage`: the stream's `message_start` usage (None: nothing was read); `seen`: output tokens the client read."""
        decision = flight.decision
        rule = self._incomplete_rule(decision)
        if usage is None and rule == "observed":
            self.release(flight)  # nothing read: nothing observed
            return
        counted: dict[str, Any] = dict(usage) if usage else {"input_tokens": decision.input_tokens}
        output = counted.get("output_tokens")
        observed = max(output if type(output) is int else 0, seen)
        counted["output_tokens"] = observed if rule == "observed" else max(observed, decision.max_tokens)
        decision.incomplete = rule
        telemetry.record_event("policy_engine.stream_abandoned", {
            "policy_engine.on_incomplete_stream": rule, "policy_engine.output_tokens": counted["output_tokens"],
            "policy_engine.output_tokens.observed": observed})
        self.settle(flight, counted, timed=False, worst_case=rule == "worst_case")

    def _incomplete_rule(self, decision: Decision) -> str:
        """The `on_incomplete_stream` of the policy that decided (worst_case if a reload has since removed it)."""
        try:
            return self.engine.policy(decision.policy_name).policy.on_incomplete_stream
        except KeyError:
            return "worst_case"

    def learn_platform(self, platform: str, flight: Flight | None = None) -> None:
        """The client turned out to talk to `platform`: decide for it from now on (and say so once), and settle
        `flight`, decided for another platform, at `platform`'s prices (a platform can charge more)."""
        if platform != self.platform:
            telemetry.record_event("policy_engine.platform_mismatch", {"policy_engine.platform": self.platform,
                                                                       "policy_engine.client_platform": platform})
            self.platform = platform
        if flight is not None and flight.decision.platform != platform:
            self.engine._replan(flight.decision, platform)

    def model_key(self, name: str) -> str:
        key = self._model_keys.get(name)
        if key is None:
            entry = self.engine.catalog.find(name, platform=self.platform)
            key = self._model_keys[name] = entry.id if entry is not None else name
        return key

    def settle(self, flight: Flight | None, usage: Any, *, timed: bool = True, worst_case: bool = False
               ) -> Settlement | None:
        """Settle from a response's usage (a dict or the SDK's Usage); a missing speed is the one sent.

        `timed`: feed the throughput observer with this non-streaming response's total time.
        `worst_case`: the usage stands in for a bill nobody saw (see `Engine.settle`).
        Returns what was recorded (None when the flight had ended already).
        """
        if flight is None or not self._finish(flight):
            return None
        decision = flight.decision
        observed = decision._observed
        if observed is not None and timed and flight.sent_at:
            observed.total_s = time.perf_counter() - flight.sent_at
        if type(usage) is dict:
            if usage.get("speed") is None:
                usage = {**usage, "speed": flight.speed}
        elif usage is not None and getattr(usage, "speed", None) is None:  # the SDK's Usage says its speed
            if isinstance(usage, Mapping):
                if usage.get("speed") is None:
                    usage = {**usage, "speed": flight.speed}
            else:
                usage = {**usage.model_dump(), "speed": flight.speed} if hasattr(usage, "model_dump") else None
        try:
            settlement = self.engine.settle(decision, usage, worst_case=worst_case)
        except UsageError as exc:
            # Billed, but we cannot tell for how much: count the worst case rather than nothing.
            telemetry.record_event("policy_engine.usage_unreadable", {"policy_engine.error": str(exc)[:200]})
            settlement = self.engine.settle(decision, _worst_case_usage(flight), worst_case=True)
        if timed and self.observer is not None and flight.sent_at:
            self.observer.observe_response(self.model_key(decision.model), settlement.speed, settlement.output_tokens,
                                           time.perf_counter() - flight.sent_at)
        return settlement

    def tracker(self, flight: Flight) -> StreamTracker:
        return StreamTracker(self, flight)


class StreamTracker:
    """Reads a Messages SSE stream as it passes and settles the flight when it ends or is dropped.

    Only `message_start` and `message_delta` are parsed as they arrive; content deltas are
    kept as raw lines and read only if the stream is abandoned, to estimate the output
    tokens seen before the caller closed it (the final `message_delta` never came).
    """

    def __init__(self, runtime: Runtime, flight: Flight) -> None:
        self.runtime = runtime
        self.flight = flight
        self._buffer = b""
        self._start: dict[str, Any] = {}
        self._final: dict[str, Any] = {}
        self._deltas: list[bytes] = []
        self._start_at = 0.0
        self._first_delta_at = 0.0
        self._final_at = 0.0
        self._finished = False

    def feed(self, chunk: bytes) -> None:
        buffer = self._buffer + chunk if self._buffer else chunk
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            if b'"content_block_delta"' in line[:60]:
                if not self._first_delta_at:
                    self._first_delta_at = time.perf_counter()
                self._deltas.append(line)
            elif b'"message_start"' in line[:40]:
                self._start_at = time.perf_counter()
                event = _event(line)
                message = event.get("message") if event else None
                if isinstance(message, dict) and isinstance(message.get("usage"), dict):
                    self._start = message["usage"]
            elif b'"message_delta"' in line[:40]:
                event = _event(line)
                usage = event.get("usage") if event else None
                if isinstance(usage, dict):
                    self._final = usage
                    self._final_at = time.perf_counter()

    def finish(self) -> None:
        """Settle with what was seen so far (idempotent): the end of the stream, or where it was dropped."""
        if self._finished:
            return
        self._finished = True
        self._settle()

    async def afinish(self) -> None:
        """`finish` for an async caller: on a worker thread when the runtime offloads (it settles in the ledger).
        A cancellation stops the waiting, never the settlement."""
        if self._finished:
            return
        self._finished = True  # on the loop, before any await: a second afinish sends no second thread
        if not self.runtime.offload:
            self._settle()
            return
        await run_in_thread(self._settle)

    def dropped(self) -> None:
        """The stream was garbage-collected unfinished: settle, off the event loop when one runs on this thread
        and the runtime offloads (a collection on the loop would otherwise wait there for the ledger)."""
        if self._finished:
            return
        if self.runtime.offload and _loop_running():
            self._finished = True
            try:
                in_background(self._settle)  # (a plain future: the loop's shutdown still runs it)
            except RuntimeError:  # collected while the loop's executor shuts down: settle here, late but settled
                self._settle()
            return
        self.finish()

    def _settle(self) -> None:
        observer, flight = self.runtime.observer, self.flight
        observed = flight.decision._observed
        if observed is not None:
            self._observe(observed)
        if not self._final:
            # Ended without the final usage: the server may have billed more than the client read.
            self.runtime.settle_incomplete(flight, self._start or None, _seen_output_tokens(self._deltas))
            return
        usage = dict(self._start)
        usage.update((k, v) for k, v in self._final.items() if v is not None)
        self.runtime.settle(flight, usage, timed=False)
        if observer is not None and self._final and self._first_delta_at and flight.sent_at:
            output = usage.get("output_tokens")
            # TTFT is what a reader waits for the first content; generation runs from message_start,
            # since the first delta already carries tokens generated after it.
            observer.observe_stream(self.runtime.model_key(flight.decision.model), str(usage.get("speed") or flight.speed),
                                    output if type(output) is int else 0, self._first_delta_at - flight.sent_at,
                                    self._final_at - self._start_at)

    def _observe(self, observed: Observed) -> None:
        """The stream's timings, for the decision log: what a reader waited for, and the generation rate."""
        sent = self.flight.sent_at
        observed.stream = True
        if not sent:
            return
        observed.total_s = (self._final_at or time.perf_counter()) - sent
        if self._first_delta_at:
            observed.ttft_s = self._first_delta_at - sent
        output = self._final.get("output_tokens")
        if self._final_at and self._start_at and type(output) is int and self._final_at > self._start_at:
            observed.output_tps = output / (self._final_at - self._start_at)


# -- the life cycle -------------------------------------------------------------------------

SEND: Final = 0
"""Send this attempt (the `Wire`'s request); resumed with the response."""
DISCARD: Final = 1
"""Close a response that will not be handed back (a fast 429 about to be retried)."""
READ: Final = 2
"""Read this response's body; resumed with what the integration's reader returns."""
SLEEP: Final = 3
"""Wait this many seconds."""
CALL: Final = 4
"""Call `(function, args)` or `(function, args, undo)`: the engine and its ledger (an async driver may run it in a
worker thread). `undo` takes the result when nobody will receive it: the caller was cancelled while a worker thread,
which cannot be stopped, went on (a reservation made for a request that will never be sent is released)."""

Step = tuple[int, Any]


class Wire(Protocol):
    """What an integration knows of its own request and response types. Nothing here does I/O."""

    streaming: bool
    """The caller asked for an SSE stream."""

    def request(self, flight: Flight | None) -> Any:
        """The request to send for this attempt (the flight's speed, body and beta applied)."""

    def inspect(self, flight: Flight | None, response: Any) -> tuple[int, Mapping[str, str], str | None]:
        """(status, headers, the credential it was sent with) of a response."""

    def failed(self, flight: Flight, exc: BaseException) -> None:
        """An attempt ended by `exc` (the runtime's `abandon`, told whether the caller will retry)."""

    def refused(self, flight: Flight, response: Any) -> None:
        """A final error status: release the flight, unless the caller will send it again."""

    def tracked(self, response: Any, tracker: StreamTracker) -> Any:
        """The response to hand back, its body read through `tracker`."""

    def concluded(self, response: Any, body: Any) -> tuple[Any, Any]:
        """(the usage to settle, the response to hand back) once the body was read."""


def exchange(runtime: Runtime, wire: Wire, body: Mapping[str, Any], beta: str | None,
             key: str | None, account: str | None = None) -> Generator[Step, Any, Any]:
    """One logical request from its decision to its settlement: returns the response to hand back."""
    flight: Flight | None = yield CALL, (runtime.flight, (body, beta, key, account), runtime.unclaimed)
    try:
        while True:
            response = yield SEND, wire.request(flight)
            status, headers, credential = wire.inspect(flight, response)
            action, wait = runtime.after_response(flight, status, headers, credential)
            if action == "done":
                break
            yield DISCARD, response
            if action == "fail":
                raise (yield CALL, (runtime.fail, (flight, wait)))
            if action == "retry":
                yield SLEEP, wait
    except GeneratorExit:  # closed before its end (garbage-collected): no step can run any more
        if flight is not None:
            wire.failed(flight, asyncio.CancelledError())
        raise
    except BaseException as exc:
        if flight is not None:
            yield CALL, (wire.failed, (flight, exc))
        raise
    if flight is None:
        return response
    if not 200 <= status < 300:
        between = unanswered(status, headers, flight.decision.platform)
        try:
            if between is not None:  # may be billed: settled as an attempt the server may have run
                yield CALL, (wire.failed, (flight, between))
            else:
                yield CALL, (wire.refused, (flight, response))
        except GeneratorExit:
            raise
        except BaseException:
            yield DISCARD, response  # nobody gets the response now: its connection goes back to the pool
            raise
        return response
    if wire.streaming:
        return wire.tracked(response, runtime.tracker(flight))
    try:
        read = yield READ, response
    except GeneratorExit:
        runtime.unread(flight, asyncio.CancelledError())
        raise
    except BaseException as exc:
        yield CALL, (runtime.unread, (flight, exc))
        raise
    usage, handed = wire.concluded(response, read)
    yield CALL, (runtime.settle, (flight, usage))
    return handed


class _Stepper:
    """Resumes a life cycle with each step's result (or throws in its exception) until it returns."""

    __slots__ = ("steps", "value", "error", "result")

    def __init__(self, steps: Generator[Step, Any, Any]) -> None:
        self.steps = steps
        self.value: Any = None
        self.error: BaseException | None = None
        self.result: Any = None

    def next(self) -> Step | None:
        """The next step to perform; None once the life cycle has returned (its value in `result`)."""
        try:
            step = self.steps.send(self.value) if self.error is None else self.steps.throw(self.error)
        except StopIteration as done:
            self.result = done.value
            return None
        self.value = self.error = None
        return step


def drive(steps: Generator[Step, Any, Any], send: Callable[[Any], Any], discard: Callable[[Any], Any],
          read: Callable[[Any], Any], sleep: Callable[[float], None]) -> Any:
    """Run a life cycle with blocking I/O."""
    perform = (send, discard, read, sleep, _call)  # indexed by the step kinds
    run = _Stepper(steps)
    while (step := run.next()) is not None:
        try:
            run.value = perform[step[0]](step[1])
        except BaseException as exc:
            run.error = exc
    return run.result


async def adrive(steps: Generator[Step, Any, Any], send: Callable[[Any], Awaitable[Any]],
                 discard: Callable[[Any], Awaitable[Any]], read: Callable[[Any], Awaitable[Any]], offload: bool) -> Any:
    """Run a life cycle on an event loop; `offload`: the engine's calls go to a worker thread (a shared
    ledger does I/O of its own, which must not hold the loop)."""
    perform = (send, discard, read, asyncio.sleep, _offloaded if offload else _acall)
    run = _Stepper(steps)
    while (step := run.next()) is not None:
        try:
            run.value = await perform[step[0]](step[1])
        except BaseException as exc:
            run.error = exc
    return run.result


def _worst_case_usage(flight: Flight) -> dict[str, Any]:
    """What an attempt nobody saw billed may have cost: the input as the decision bounded it, max_tokens of output."""
    decision = flight.decision
    return {"input_tokens": decision.input_tokens, "output_tokens": decision.max_tokens, "speed": flight.speed}


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _call(call: tuple[Any, ...]) -> Any:
    return call[0](*call[1])


async def _acall(call: tuple[Any, ...]) -> Any:
    return call[0](*call[1])


async def _offloaded(call: tuple[Any, ...]) -> Any:
    return await run_in_thread(call[0], *call[1], undo=call[2] if len(call) > 2 else None)


def body_usage(content: bytes) -> Any:
    """The `usage` of a JSON response body (None when the body is not a JSON object)."""
    try:
        data = json.loads(content)
    except ValueError:
        return None
    return data.get("usage") if isinstance(data, dict) else None


_ACCOUNTS_KEPT: Final = 1024
"""Credentials whose account hash is remembered (a deployment has a few keys; a client sending random ones
must not grow the cache without end)."""

_BILLABLE_FAILURES: Final = frozenset({"ReadTimeout", "WriteTimeout", "ReadError", "RemoteProtocolError",
                                       "CancelledError", "UpstreamUnanswered"})
"""httpx's (and httpx2's) errors raised once a request may have reached the server, and a cancellation (a
task cancelled by its caller or by a server shutting down): once an attempt was handed to the transport,
nothing says its bytes had not gone out, and the server goes on generating what it got."""


def _may_be_billed(exc: BaseException) -> bool:
    """Whether the server may have received, and so may bill, the request an exception ended."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 8:
        if any(t.__name__ in _BILLABLE_FAILURES for t in type(cause).__mro__):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


def _wire_chain(body: Mapping[str, Any], rewritten: list[Any] | None, fell_back: bool) -> Mapping[str, Any]:
    """The body with the decision's `fallbacks` (entries a guardrail keeps from fast sent at standard); after a
    fast 429 sent the request at standard, every entry goes at standard too (inheriting entries follow the request)."""
    fallbacks: Any = rewritten if rewritten is not None else body.get("fallbacks")
    if fell_back and isinstance(fallbacks, list):
        fallbacks = [{**e, "speed": "standard"} if isinstance(e, Mapping) and e.get("speed") == "fast" else e for e in fallbacks]
    elif rewritten is None:
        return body
    return {**body, "fallbacks": fallbacks}


def _event(line: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(line[5:])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _seen_output_tokens(lines: list[bytes]) -> int:
    parts = []
    for line in lines:
        event = _event(line)
        delta = event.get("delta") if event else None
        if isinstance(delta, dict):
            for name in ("text", "thinking", "partial_json"):
                value = delta.get(name)
                if isinstance(value, str):
                    parts.append(value)
    return int(estimate_text_tokens("".join(parts)) + 0.999) if parts else 0
