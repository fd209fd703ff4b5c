"""Fast-mode policies for raw httpx users of the Messages API: a transport wrapper.

    import httpx, policy_engine
    from policy_engine.integrations.httpx import FastModeTransport

    engine = policy_engine.load("policies/default.yaml")
    client = httpx.Client(base_url="https://api.anthropic.com",
                          transport=FastModeTransport(engine, context={"interactive": True}))
    client.post("/v1/messages", json={...}, headers={"x-api-key": ..., "anthropic-version": "2023-06-01"})

Same behaviour as the SDK middleware (`policy_engine.integrations.anthropic`): each POST
to /v1/messages is decided, rewritten (body `speed`, `anthropic-beta` header), sent
through the wrapped transport (default: httpx's own), and settled from the response
body or, for `"stream": true`, from the SSE stream as the caller reads it. httpx has no
retry loop, so each call is one logical request: a transport-level error or an error
status releases the reservation. A fast-mode 429 follows `on_fast_rate_limited`.
Responses to /v1/messages are handed back decoded (no `content-encoding`), since the
transport reads them on the way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import httpx

from ..decide import Engine
from ._core import (
    ContextSource,
    FastModeRateLimited,
    Flight,
    Runtime,
    StreamTracker,
    adrive,
    body_usage,
    drive,
    endpoint,
    exchange,
    policy_context,
    strip_batch_speed,
)
from ._streams import decoded_headers, tracked_stream

__all__ = ["FastModeTransport", "AsyncFastModeTransport", "FastModeRateLimited", "policy_context"]

_Tracked = tracked_stream(httpx)


def _json_body(request: httpx.Request) -> Any:
    try:
        return json.loads(request.content or b"null")
    except (ValueError, httpx.RequestNotRead):
        return None


def _rebuild(request: httpx.Request, body: Any, beta: str | None) -> httpx.Request:
    headers = request.headers.copy()
    if beta is not None:
        headers["anthropic-beta"] = beta
    if "content-length" in headers:
        del headers["content-length"]  # httpx sets the new body's length
    return httpx.Request(request.method, request.url, headers=headers,
                         content=json.dumps(body, separators=(",", ":")).encode(), extensions=request.extensions)


class _Base:
    def __init__(self, engine: Engine, *, context: ContextSource, policy: str | None, account: str | None,
                 observe: bool, fast_retries: int, max_retry_wait_s: float) -> None:
        self.engine = engine
        self.runtime = Runtime(engine, context=context, policy=policy, account=account, observe=observe,
                               fast_retries=fast_retries, max_retry_wait_s=max_retry_wait_s)

    def _call(self, request: httpx.Request) -> tuple[httpx.Request | None, MessagesCall | None]:
        """(a request to pass on as it is, None) or (None, the call to run through the life cycle)."""
        kind = endpoint(request.url.path) if request.method == "POST" else None
        body = _json_body(request) if kind is not None else None
        if kind == "batches" and isinstance(body, Mapping):
            stripped = strip_batch_speed(body)
            return (request if stripped is body else _rebuild(request, stripped, None)), None
        if kind != "messages" or not isinstance(body, Mapping):
            return request, None
        return None, MessagesCall(self.runtime, request, body)


class MessagesCall:
    """The `Wire` of one httpx request, for the life cycle (`_core.exchange`). httpx has no retry loop of its
    own: an error status or a transport error ends the logical request. The proxy (`policy_engine.serve`)
    drives the same wire: its upstream requests are httpx requests too."""

    __slots__ = ("runtime", "original", "body", "beta", "streaming", "credential", "flight")

    def __init__(self, runtime: Runtime, request: httpx.Request, body: Mapping[str, Any]) -> None:
        self.runtime = runtime
        self.original = request
        self.body = body
        self.beta = request.headers.get("anthropic-beta")
        self.streaming = body.get("stream") is True
        # A transport's response has no request: the key the attempts are sent with is the caller's.
        self.credential = request.headers.get("x-api-key") or request.headers.get("authorization")
        self.flight: Flight | None = None
        """The flight of the last attempt sent (None: undecidable, sent as it was)."""

    def steps(self, account: str | None = None) -> Any:
        return exchange(self.runtime, self, self.body, self.beta, None, account)

    def request(self, flight: Flight | None) -> httpx.Request:
        self.flight = flight
        if flight is not None:
            flight.sent_at = time.perf_counter()
        wire_body, wire_beta = self.runtime.wire_body(flight, self.body), self.runtime.wire_beta(flight, self.beta)
        if wire_body is self.body and wire_beta == self.beta:
            return self.original
        return _rebuild(self.original, wire_body, wire_beta)

    def inspect(self, flight: Flight | None, response: httpx.Response) -> tuple[int, Any, str | None]:
        return response.status_code, response.headers, self.credential

    def failed(self, flight: Flight, exc: BaseException) -> None:
        self.runtime.abandon(flight, exc)

    def refused(self, flight: Flight, response: httpx.Response) -> None:
        self.runtime.release(flight)

    def tracked(self, response: httpx.Response, tracker: StreamTracker) -> httpx.Response:
        return httpx.Response(response.status_code, headers=decoded_headers(response.headers),
                              stream=_Tracked(response, tracker), extensions=response.extensions)

    def concluded(self, response: httpx.Response, content: bytes) -> tuple[Any, httpx.Response]:
        read = httpx.Response(response.status_code, headers=decoded_headers(response.headers), content=content,
                              extensions=response.extensions)
        return body_usage(content), read


class FastModeTransport(_Base, httpx.BaseTransport):
    """An `httpx.BaseTransport` applying an `Engine`'s decisions to Messages API requests.

    `transport`: the transport to send through (default `httpx.HTTPTransport()`). The
    other options are those of `FastModePolicy`.
    """

    def __init__(self, engine: Engine, transport: httpx.BaseTransport | None = None, *, context: ContextSource = None,
                 policy: str | None = None, account: str | None = None, observe: bool = True, fast_retries: int = 2,
                 max_retry_wait_s: float = 30.0) -> None:
        super().__init__(engine, context=context, policy=policy, account=account, observe=observe,
                         fast_retries=fast_retries, max_retry_wait_s=max_retry_wait_s)
        self._inner = transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        passed, call = self._call(request)
        if call is None:
            return self._inner.handle_request(passed)  # type: ignore[arg-type]
        return drive(call.steps(), self._inner.handle_request, httpx.Response.close, httpx.Response.read,  # type: ignore[no-any-return]
                     self.runtime.sleep)

    def close(self) -> None:
        self._inner.close()


class AsyncFastModeTransport(_Base, httpx.AsyncBaseTransport):
    """The `httpx.AsyncBaseTransport` counterpart of `FastModeTransport`."""

    def __init__(self, engine: Engine, transport: httpx.AsyncBaseTransport | None = None, *,
                 context: ContextSource = None, policy: str | None = None, account: str | None = None,
                 observe: bool = True, fast_retries: int = 2, max_retry_wait_s: float = 30.0) -> None:
        super().__init__(engine, context=context, policy=policy, account=account, observe=observe,
                         fast_retries=fast_retries, max_retry_wait_s=max_retry_wait_s)
        self._inner = transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        passed, call = self._call(request)
        if call is None:
            return await self._inner.handle_async_request(passed)  # type: ignore[arg-type]
        return await adrive(call.steps(), self._inner.handle_async_request, httpx.Response.aclose,  # type: ignore[no-any-return]
                            httpx.Response.aread, self.runtime.offload)

    async def aclose(self) -> None:
        await self._inner.aclose()
