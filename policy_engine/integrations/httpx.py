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

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import httpx

from ..decide import Engine
from ..ledger import MemoryLedger
from ._core import (
    ContextSource,
    FastModeRateLimited,
    Flight,
    Runtime,
    endpoint,
    policy_context,
    strip_batch_speed,
)
from ._streams import decoded_headers, tracked_streams

__all__ = ["FastModeTransport", "AsyncFastModeTransport", "FastModeRateLimited", "policy_context"]

_Tracked, _AsyncTracked = tracked_streams(httpx)


def _json_body(request: httpx.Request) -> Any:
    try:
        return json.loads(request.content or b"null")
    except (ValueError, httpx.RequestNotRead):
        return None


def _credential(request: httpx.Request) -> str | None:
    return request.headers.get("x-api-key") or request.headers.get("authorization")


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

    @staticmethod
    def _route(request: httpx.Request) -> tuple[httpx.Request | None, Mapping[str, Any] | None]:
        """(a request to pass on as it is, None) or (None, the Messages body to decide)."""
        kind = endpoint(request.url.path) if request.method == "POST" else None
        body = _json_body(request) if kind is not None else None
        if kind == "batches" and isinstance(body, Mapping):
            stripped = strip_batch_speed(body)
            return (request if stripped is body else _rebuild(request, stripped, None)), None
        if kind != "messages" or not isinstance(body, Mapping):
            return request, None
        return None, body

    def _conclude(self, flight: Flight | None, response: httpx.Response, body: Mapping[str, Any],
                  tracked: type) -> httpx.Response | None:
        """The response to hand back, or None when its body must be read and settled first."""
        if flight is None:
            return response
        if not 200 <= response.status_code < 300:
            self.runtime.release(flight)
            return response
        if body.get("stream") is True:
            return httpx.Response(response.status_code, headers=decoded_headers(response.headers),
                                  stream=tracked(response, self.runtime.tracker(flight)), extensions=response.extensions)
        return None

    @staticmethod
    def _read(response: httpx.Response, content: bytes) -> httpx.Response:
        return httpx.Response(response.status_code, headers=decoded_headers(response.headers), content=content,
                              extensions=response.extensions)

    def _wire(self, request: httpx.Request, flight: Flight | None, body: Mapping[str, Any], beta: str | None) -> httpx.Request:
        runtime = self.runtime
        if flight is not None:
            flight.sent_at = time.perf_counter()
        wire_body, wire_beta = runtime.wire_body(flight, body), runtime.wire_beta(flight, beta)
        if wire_body is body and wire_beta == beta:
            return request
        return _rebuild(request, wire_body, wire_beta)


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
        passed, body = self._route(request)
        if body is None:
            return self._inner.handle_request(passed)  # type: ignore[arg-type]
        runtime = self.runtime
        beta = request.headers.get("anthropic-beta")
        flight = runtime.flight(body, beta, None)
        try:
            while True:
                wire = self._wire(request, flight, body, beta)
                response = self._inner.handle_request(wire)
                action, wait = runtime.after_response(flight, response.status_code, response.headers, _credential(wire))
                if action == "done":
                    break
                response.close()
                if action == "fail":
                    raise runtime.fail(flight, wait)  # type: ignore[arg-type]
                if action == "retry":
                    runtime.sleep(wait)
        except BaseException as exc:
            runtime.abandon(flight, exc)
            raise
        concluded = self._conclude(flight, response, body, _Tracked)
        if concluded is not None:
            return concluded
        try:
            content = response.read()
        except BaseException as exc:
            runtime.abandon(flight, exc)
            raise
        runtime.settle_body(flight, content)
        return self._read(response, content)

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
        self._offload = not isinstance(engine.ledger, MemoryLedger)

    async def _call(self, function: Any, *args: Any) -> Any:
        # A shared ledger does I/O: keep it off the event loop.
        return await asyncio.to_thread(function, *args) if self._offload else function(*args)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        passed, body = self._route(request)
        if body is None:
            return await self._inner.handle_async_request(passed)  # type: ignore[arg-type]
        runtime = self.runtime
        beta = request.headers.get("anthropic-beta")
        flight = await self._call(runtime.flight, body, beta, None)
        try:
            while True:
                wire = self._wire(request, flight, body, beta)
                response = await self._inner.handle_async_request(wire)
                action, wait = runtime.after_response(flight, response.status_code, response.headers, _credential(wire))
                if action == "done":
                    break
                await response.aclose()
                if action == "fail":
                    raise runtime.fail(flight, wait)  # type: ignore[arg-type]
                if action == "retry":
                    await asyncio.sleep(wait)
        except BaseException as exc:
            runtime.abandon(flight, exc)
            raise
        concluded = self._conclude(flight, response, body, _AsyncTracked)
        if concluded is not None:
            return concluded
        try:
            content = await response.aread()
        except BaseException as exc:
            runtime.abandon(flight, exc)
            raise
        await self._call(runtime.settle_body, flight, content)
        return self._read(response, content)

    async def aclose(self) -> None:
        await self._inner.aclose()
