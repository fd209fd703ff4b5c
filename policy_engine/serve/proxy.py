"""The proxy: the third driver of the request life cycle (`integrations._core.exchange`).

A client's `POST /v1/messages` becomes an httpx request upstream and goes through the very wire
the httpx transport drives (`integrations.httpx.MessagesCall`): decided, rewritten, sent, a fast
429 handled, settled from the body or the stream as it passes. The proxy adds only what an HTTP
hop needs: the context from `x-policy-*` headers, the decision in the response's headers, and the
engine's refusals as Anthropic-shaped error responses. Every other path passes through untouched
(a batch's `speed` fields removed: the Batch API refuses fast mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import posixpath
import re
from collections.abc import Callable
from typing import Any, Final

import httpx
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from ..errors import CeilingExceeded, InvalidContext, StateUnavailable
from ..integrations._core import (FastModeRateLimited, Runtime, adrive, body_usage, endpoint, policy_context,
                                  strip_batch_speed)
from ..integrations.httpx import MessagesCall
from .headers import PREFIX, client_headers, context_from_headers, decision_headers, upstream_headers
from .upstream import UpstreamTransport

__all__ = ["Proxy", "BodyTooLarge", "ClientGone", "read_body"]

log = logging.getLogger("policy_engine.serve")


class BodyTooLarge(Exception):
    """A request body over the server's `max_body_bytes`."""


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The whole request body, refusing one longer than `limit` bytes before reading it all."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge()
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


class ClientGone(Exception):
    """The client disconnected before its request was read: there is no one to answer."""


def api_error(status: int, kind: str, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the Messages API's own shape (so every SDK reads it), with the proxy's code beside it."""
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status,
                        headers={PREFIX + "error": code, **(headers or {})})


_NO_RETRY: Final = {"x-should-retry": "false"}
"""The anthropic SDKs honour it: a refusal by policy is not worth sending again."""

_URLS_KEPT: Final = 1024


class Proxy:
    """An ASGI application forwarding Anthropic API requests upstream, deciding and settling the Messages calls.

    Plain ASGI rather than a framework's request and response objects: they cost more than the rest of the
    hop together (issue 17's target is at most 1 ms added per request)."""

    def __init__(self, upstream: str, runtime: Callable[[], Runtime], *, offload: bool, max_body_bytes: int,
                 timeout: httpx.Timeout, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.upstream = httpx.URL(upstream.rstrip("/"))
        self.runtime = runtime
        self.offload = offload
        """The engine's calls go to a worker thread: a shared ledger does I/O that must not hold the loop."""
        self.max_body_bytes = max_body_bytes
        self._timeout = {"connect": timeout.connect, "read": timeout.read, "write": timeout.write, "pool": timeout.pool}
        self.transport = transport or UpstreamTransport(max_connections=512, max_keepalive=128, keepalive_expiry_s=30.0)
        self._urls: dict[tuple[bytes, bytes], httpx.URL] = {}

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Any request: a Messages call through the life cycle, everything else passed on."""
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]]
        method, path = scope["method"], scope["path"]
        if method == "POST" and _respelt(path):
            response = api_error(404, "not_found_error", f"policy_engine: {path!r} names {_canonical(path)!r}: send it "
                                 "by that name (the proxy meters Messages and batch calls by their path)",
                                 "non_canonical_path", _NO_RETRY)
            return await response(scope, receive, send)
        try:
            body = await read_body(receive, _header(headers, "content-length"), self.max_body_bytes)
        except BodyTooLarge:
            response = api_error(413, "request_too_large", f"request body over {self.max_body_bytes} bytes",
                                 "request_too_large", _NO_RETRY)
            return await response(scope, receive, send)
        except ClientGone:
            return None
        kind = endpoint(path) if method == "POST" else None
        parsed = _json_object(body) if kind is not None else None
        if kind == "messages" and parsed is not None:
            relayed = await self._messages(scope, headers, body, parsed)
        else:
            if kind == "batches" and parsed is not None:
                stripped = strip_batch_speed(parsed)
                if stripped is not parsed:
                    body = json.dumps(stripped, separators=(",", ":")).encode()
            relayed = await self._forward(self._upstream_request(scope, headers, body, identity=False),
                                          decision_headers(None) if kind == "messages" else [])
        if isinstance(relayed, JSONResponse):
            return await relayed(scope, receive, send)
        await _relay(relayed[0], relayed[1], receive, send)

    def _url(self, scope: Scope) -> httpx.URL:
        key = (scope.get("raw_path") or scope["path"].encode(), scope.get("query_string", b""))
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= _URLS_KEPT:
                self._urls.clear()  # a client probing random paths must not grow the cache without end
            target = self.upstream.raw_path.rstrip(b"/") + key[0] + (b"?" + key[1] if key[1] else b"")
            url = self._urls[key] = self.upstream.copy_with(raw_path=target)
        return url

    def _upstream_request(self, scope: Scope, headers: list[tuple[str, str]], body: bytes, *,
                          identity: bool) -> httpx.Request:
        # Back to the client's bytes (latin-1 maps each byte to one character and back): a header httpx would
        # refuse to encode as str (anything not ASCII) goes on as it came.
        sent = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in upstream_headers(headers, identity=identity)]
        return httpx.Request(scope["method"], self._url(scope), headers=sent, content=body,
                             extensions={"timeout": self._timeout})

    async def _messages(self, scope: Scope, headers: list[tuple[str, str]], raw: bytes,
                        body: dict[str, Any]) -> Relayed | JSONResponse:
        runtime = self.runtime()
        call = _Call(runtime, self._upstream_request(scope, headers, raw, identity=True), body)
        context = context_from_headers(headers)
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
        except httpx.HTTPError as exc:
            return _upstream_failed(exc)
        return response, decision_headers(call.flight)

    async def _forward(self, upstream: httpx.Request, extra: list[tuple[str, str]]) -> Relayed | JSONResponse:
        try:
            response = await self.transport.handle_async_request(upstream)
        except httpx.TransportError as exc:
            return _upstream_failed(exc)
        return response, extra


def _upstream_failed(exc: httpx.HTTPError) -> JSONResponse:
    if isinstance(exc, httpx.TimeoutException):
        return api_error(504, "api_error", f"upstream timed out: {type(exc).__name__}", "upstream_timeout")
    if isinstance(exc, httpx.DecodingError):
        return api_error(502, "api_error", f"upstream answer unreadable: {exc}", "upstream_unreadable")
    return api_error(502, "api_error", f"upstream unreachable: {type(exc).__name__}", "upstream_unavailable")


class _Call(MessagesCall):
    """The httpx transports' wire, but a body read whole is handed on as the upstream response itself: the proxy
    asked for it uncompressed and relays its bytes, so the decoded copy made for an SDK is not needed."""

    __slots__ = ()

    def concluded(self, response: httpx.Response, content: bytes) -> tuple[Any, httpx.Response]:
        return body_usage(content), response


Relayed = tuple[httpx.Response, list[tuple[str, str]]]
"""An upstream response and the decision headers to add to it."""


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for n, v in headers if n == name), None)


async def _relay(response: httpx.Response, extra: list[tuple[str, str]], receive: Receive, send: Send) -> None:
    """The client's response: a body already read sent as it is, anything else streamed as it arrives."""
    try:
        raw = client_headers(response.headers) + [(n.encode(), v.encode()) for n, v in extra]
        if response.is_stream_consumed:
            content = response.content  # decoded, should the upstream have compressed it anyway
            raw = [(n, v) for n, v in raw if n.lower() != b"content-encoding"]
            raw.append((b"content-length", b"%d" % len(content)))
            await send({"type": "http.response.start", "status": response.status_code, "headers": raw})
            await send({"type": "http.response.body", "body": content})
            return
        await send({"type": "http.response.start", "status": response.status_code, "headers": raw})
    except BaseException:
        await response.aclose()  # its connection goes back, and a tracked stream settles (nothing of it read)
        raise
    await _stream(response, receive, send)


async def _stream(response: httpx.Response, receive: Receive, send: Send) -> None:
    """Each part of the body sent as it arrives, until its end or until the client goes away. Closing the
    response settles a tracked stream: at its end, or where it was cut, by the policy's on_incomplete_stream."""
    pump = asyncio.ensure_future(_pump(response, send))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
        if pump.done():
            pump.result()
    except httpx.TransportError as exc:
        # The status line is gone already: returning without the body's end makes the server close the
        # connection, which is how the client learns that the stream was cut. One line, not a traceback.
        log.warning("upstream failed mid-stream (%s: %s): the client's response is cut short; the stream "
                    "settles by the policy's on_incomplete_stream", type(exc).__name__, exc)
    finally:
        for task in (pump, gone):
            task.cancel()
        await asyncio.gather(pump, gone, return_exceptions=True)
        await response.aclose()


async def _pump(response: httpx.Response, send: Send) -> None:
    async for chunk in response.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _canonical(path: str) -> str:
    """`path` as a server may route it: dot segments resolved, empty segments and `;` parameters dropped, in lower case."""
    return posixpath.normpath(_PARAMETERS.sub("", path)).lower().replace("//", "/")


def _respelt(path: str) -> bool:
    """Does `path` name a Messages or batch endpoint in another spelling (`/v1/x/../messages`, `/v1//messages/`)?
    Passed on, it would reach the API unmetered: the proxy tells the endpoints by their path as spelt."""
    if "/." not in path and "//" not in path and ";" not in path and not path.endswith("/") and path.islower():
        return False  # the usual spelling, told without normalising
    canonical = _canonical(path)
    return canonical != path and endpoint(canonical) is not None


_PARAMETERS: Final = re.compile(r";[^/]*")


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
