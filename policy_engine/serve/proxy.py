"""The proxy: the third driver of the request life cycle (`integrations._core.exchange`).

A client's `POST /v1/messages` becomes an httpx request upstream and goes through the very wire
the httpx transport drives (`integrations.httpx.MessagesCall`): decided, rewritten, sent, a fast
429 handled, settled from the body or the stream as it passes. The proxy adds only what an HTTP
hop needs: the context from `x-policy-*` headers, the decision in the response's headers, and the
engine's refusals as Anthropic-shaped error responses. Every other path passes through untouched
(a batch's `speed` fields removed: the Batch API refuses fast mode).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import CeilingExceeded, InvalidContext, StateUnavailable
from ..integrations._core import FastModeRateLimited, Runtime, adrive, endpoint, policy_context, strip_batch_speed
from ..integrations.httpx import MessagesCall
from .headers import PREFIX, client_headers, context_from_headers, decision_headers, upstream_headers

__all__ = ["Proxy", "BodyTooLarge", "read_body"]


class BodyTooLarge(Exception):
    """A request body over the server's `max_body_bytes`."""


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refusing one longer than `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def api_error(status: int, kind: str, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the Messages API's own shape (so every SDK reads it), with the proxy's code beside it."""
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status,
                        headers={PREFIX + "error": code, **(headers or {})})


_NO_RETRY: Final = {"x-should-retry": "false"}
"""The anthropic SDKs honour it: a refusal by policy is not worth sending again."""


class Proxy:
    """Forwards Anthropic API requests upstream, deciding and settling the Messages calls."""

    def __init__(self, upstream: str, runtime: Callable[[], Runtime], *, offload: bool, max_body_bytes: int,
                 timeout: httpx.Timeout, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.upstream = httpx.URL(upstream.rstrip("/"))
        self.runtime = runtime
        self.offload = offload
        """The engine's calls go to a worker thread: a shared ledger does I/O that must not hold the loop."""
        self.max_body_bytes = max_body_bytes
        self._timeout = {"connect": timeout.connect, "read": timeout.read, "write": timeout.write, "pool": timeout.pool}
        self.transport = transport or httpx.AsyncHTTPTransport(retries=0, limits=httpx.Limits(
            max_connections=512, max_keepalive_connections=128, keepalive_expiry=30.0))

    async def aclose(self) -> None:
        await self.transport.aclose()

    def _upstream_request(self, request: Request, body: bytes, *, identity: bool) -> httpx.Request:
        path = request.url.path
        query = request.url.query
        url = self.upstream.copy_with(raw_path=(self.upstream.raw_path.rstrip(b"/") + path.encode()
                                                + (b"?" + query.encode() if query else b"")))
        return httpx.Request(request.method, url, headers=upstream_headers(request.headers.items(), identity=identity),
                             content=body, extensions={"timeout": self._timeout})

    async def handle(self, request: Request) -> Response:
        """Any request: a Messages call through the life cycle, everything else passed on."""
        try:
            body = await read_body(request, self.max_body_bytes)
        except BodyTooLarge:
            return api_error(413, "request_too_large", f"request body over {self.max_body_bytes} bytes",
                             "request_too_large", _NO_RETRY)
        kind = endpoint(request.url.path) if request.method == "POST" else None
        parsed = _json_object(body) if kind is not None else None
        if kind == "messages" and parsed is not None:
            return await self._messages(request, body, parsed)
        if kind == "batches" and parsed is not None:
            stripped = strip_batch_speed(parsed)
            if stripped is not parsed:
                body = json.dumps(stripped, separators=(",", ":")).encode()
        return await self._forward(self._upstream_request(request, body, identity=False))

    async def _messages(self, request: Request, raw: bytes, body: dict[str, Any]) -> Response:
        runtime = self.runtime()
        call = MessagesCall(runtime, self._upstream_request(request, raw, identity=True), body)
        context = context_from_headers(request.headers.items())
        account = runtime.account_from(call.credential)  # each API key has rate limits of its own
        try:
            with policy_context(**context) if context else contextlib.nullcontext():
                response = await adrive(call.steps(account), self.transport.handle_async_request,
                                        httpx.Response.aclose, httpx.Response.aread, self.offload)
        except CeilingExceeded as exc:
            return api_error(403, "permission_error", f"policy_engine: {exc}", "ceiling_exceeded", _NO_RETRY)
        except InvalidContext as exc:
            return api_error(400, "invalid_request_error", f"policy_engine: {exc}", "invalid_context", _NO_RETRY)
        except StateUnavailable as exc:
            return api_error(503, "api_error", f"policy_engine: {exc}", "state_unavailable")
        except FastModeRateLimited as exc:
            wait = {"retry-after": f"{exc.retry_after_s:g}"} if exc.retry_after_s else {}
            return api_error(429, "rate_limit_error", f"policy_engine: {exc}", "fast_rate_limited", wait)
        except httpx.TimeoutException as exc:
            return api_error(504, "api_error", f"upstream timed out: {type(exc).__name__}", "upstream_timeout")
        except httpx.TransportError as exc:
            return api_error(502, "api_error", f"upstream unreachable: {type(exc).__name__}", "upstream_unavailable")
        return _relay(response, decision_headers(call.flight))

    async def _forward(self, upstream: httpx.Request) -> Response:
        try:
            response = await self.transport.handle_async_request(upstream)
        except httpx.TimeoutException as exc:
            return api_error(504, "api_error", f"upstream timed out: {type(exc).__name__}", "upstream_timeout")
        except httpx.TransportError as exc:
            return api_error(502, "api_error", f"upstream unreachable: {type(exc).__name__}", "upstream_unavailable")
        return _relay(response, [])


def _relay(response: httpx.Response, extra: list[tuple[str, str]]) -> Response:
    """The client's response: a body already read as it is, anything else streamed as it arrives."""
    headers = client_headers(response.headers) + extra
    if response.is_stream_consumed:
        relayed = Response(response.content, status_code=response.status_code)
    else:
        relayed = StreamingResponse(_chunks(response), status_code=response.status_code)
    # Starlette's Response takes a dict; a response may repeat a header (set-cookie), so set the raw list.
    relayed.raw_headers = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers] + [
        h for h in relayed.raw_headers if h[0] == b"content-length"]
    return relayed


async def _chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    # Closing settles a tracked stream: at its end, or where the client went away (the server then
    # stops iterating here), by the policy's on_incomplete_stream.
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
