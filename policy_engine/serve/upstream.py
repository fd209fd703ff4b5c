"""The proxy's HTTP/1.1 client to its upstream: an httpx transport on asyncio and httptools.

Why not httpx's own `AsyncHTTPTransport`: on the 2-core benchmark host it costs about 1.2 ms of
CPU per request (httpcore, anyio and h11, all pure Python), more than the whole 1 ms the proxy may
add (issue 17). This transport writes each request in one write, parses responses with httptools
(the C parser uvicorn itself uses), keeps connections alive, and streams a body as it arrives,
pausing the upstream socket while the client is slower. It speaks what an API upstream needs:
HTTP/1.1 over TCP or TLS, request bodies of known length, any response framing.

Failures are httpx's own exceptions, so the life cycle judges them as it judges httpx's: a
`ReadTimeout`, `ReadError` or `RemoteProtocolError` once the request is written may have been
billed. A request is never sent twice.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any, Final

import httptools
import httpx

__all__ = ["UpstreamTransport"]

_HIGH_WATER: Final = 1 << 20
"""Bytes of a body read ahead of the client before the upstream socket is paused."""

class _Connection(asyncio.Protocol):
    """One keep-alive connection, and the response being read on it (httptools calls the on_* methods)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed: BaseException | None = None
        self.active = False
        """A request is out on it: bytes arriving on an idle connection are not a response to anything."""
        self.idle_since = 0.0
        self._writable: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.has_head = False
        self.keep_alive = False
        self.complete = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:
            self._fail(httpx.RemoteProtocolError("upstream sent bytes on an idle connection"))
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"upstream sent malformed HTTP: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.has_head and not self.complete and exc is None and self._delimited_by_close():
            self.complete = True  # the body's end is the connection's
        self._fail(httpx.ReadError(f"upstream connection lost: {exc}") if exc else
                   httpx.RemoteProtocolError("upstream closed the connection before the response ended"))
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(httpx.WriteError("upstream connection lost while writing"))

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.has_head:  # httptools raises it as HttpParserCallbackError: the connection is dropped
            raise httpx.RemoteProtocolError("upstream sent bytes after its response")

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is complete
        if self.status >= 200:  # an interim 1xx is followed by the real response
            self.has_head = True
            if self._writable is not None and not self._writable.done():
                # An early answer (a 413 or 401 before a large body is read): it is the response. The rest of
                # the body is not sent; the connection cannot serve another request.
                self.keep_alive = False
                self._writable.set_result(None)
            self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status < 200:
            self._reset()
            return
        self.complete = True
        self._wake()

    # the transport's side

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.active = True
        self.transport.write(data)

    async def written(self, timeout: float | None) -> None:
        """The request's bytes handed to the kernel (a large body may wait for the socket to drain)."""
        if self._writable is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._writable), timeout)
        except asyncio.TimeoutError:
            raise httpx.WriteTimeout("upstream took too long to accept the request body") from None
        except httpx.WriteError:
            if not self.has_head:  # the upstream answered, then closed: its answer counts
                raise

    async def head(self, timeout: float | None) -> None:
        while not self.has_head:
            await self._wait(timeout)

    async def chunk(self, timeout: float | None) -> bytes:
        """The next part of the body as it arrived, or b"" at its end."""
        while not self.body:
            if self.complete:
                return b""
            await self._wait(timeout)
        part = self.body.popleft()
        self.buffered -= len(part)
        if self.buffered <= _HIGH_WATER // 2 and self.transport is not None and not self.closed:
            self.transport.resume_reading()
        return part

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.closed is None

    def recycle(self) -> None:
        self._reset()
        self.active = False
        self.parser = httptools.HttpResponseParser(self)

    def abort(self) -> None:
        if self.closed is None:
            self.closed = httpx.ReadError("upstream connection closed")
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self.closed is None:
            self.closed = error
        self._wake()

    async def _wait(self, timeout: float | None) -> None:
        if self.closed is not None and not (self.complete or self.body):
            raise self.closed
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        # A timer rather than asyncio.wait_for: this wait happens for every response and every body part.
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()
        if self.closed is not None and not (self.complete or self.body or self.has_head):
            raise self.closed

    def _delimited_by_close(self) -> bool:
        """No length and not chunked: the body ends with the connection (RFC 9112, 6.3)."""
        lengths = [v for n, v in self.headers if n.lower() == b"content-length"]
        codings = b",".join(v for n, v in self.headers if n.lower() == b"transfer-encoding")
        return not lengths and codings.rsplit(b",", 1)[-1].strip().lower() != b"chunked"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("upstream took too long to respond"))


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection as the client takes it; the connection goes back to the
    pool at the body's end, and is closed if the body is left unread."""

    def __init__(self, pool: _Pool, connection: _Connection, timeout: float | None) -> None:
        self._pool, self._connection, self._timeout = pool, connection, timeout
        self._done = False

    async def __aiter__(self) -> Any:
        connection = self._connection
        try:
            while part := await connection.chunk(self._timeout):
                yield part
        except BaseException:
            await self.aclose()
            raise
        self._finish(keep=True)  # the pool keeps it if the response left it reusable

    async def aclose(self) -> None:
        self._finish(keep=False)

    def _finish(self, *, keep: bool) -> None:
        if not self._done:
            self._done = True
            self._pool.release(self._connection, keep)


class _Pool:
    """The connections to one origin: idle ones reused newest first, at most `size` open."""

    def __init__(self, origin: tuple[str, str, int], ssl_context: ssl.SSLContext | None, size: int, keepalive: int,
                 expiry_s: float) -> None:
        self.origin, self.ssl_context = origin, ssl_context
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(size)
        self.keepalive, self.expiry_s = keepalive, expiry_s
        self.closed = False

    async def acquire(self, timeouts: dict[str, float | None]) -> _Connection:
        if self.slots.locked():
            try:
                await asyncio.wait_for(self.slots.acquire(), timeouts.get("pool"))
            except asyncio.TimeoutError:
                raise httpx.PoolTimeout("no upstream connection free in time") from None
        else:
            await self.slots.acquire()
        try:
            now = time.monotonic()
            while self.idle:
                connection = self.idle.pop()
                if (connection.closed is None and now - connection.idle_since < self.expiry_s
                        and connection.transport is not None and not connection.transport.is_closing()):
                    return connection  # (closing: the peer's EOF seen, connection_lost not yet called)
                connection.abort()
            return await self._connect(timeouts.get("connect"))
        except BaseException:
            self.slots.release()
            raise

    def release(self, connection: _Connection, keep: bool) -> None:
        if keep and connection.reusable and len(self.idle) < self.keepalive and not self.closed:
            connection.recycle()
            connection.idle_since = time.monotonic()
            self.idle.append(connection)
        else:
            connection.abort()
        self.slots.release()

    async def _connect(self, timeout: float | None) -> _Connection:
        scheme, host, port = self.origin
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(loop.create_connection(
                _Connection, host, port, ssl=self.ssl_context, server_hostname=host if self.ssl_context else None),
                timeout)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} took too long") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {scheme}://{host}:{port}: {exc}") from exc
        return connection

    def close(self) -> None:
        """Close the idle connections; those in use close when their response ends."""
        self.closed = True
        for connection in self.idle:
            connection.abort()
        self.idle.clear()


class UpstreamTransport(httpx.AsyncBaseTransport):
    """An `httpx.AsyncBaseTransport` for the proxy's upstream: HTTP/1.1, keep-alive, bodies streamed."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, max_connections: int = 512,
                 max_keepalive: int = 128, keepalive_expiry_s: float = 30.0) -> None:
        self._ssl_context = ssl_context
        self._limits = (max_connections, max_keepalive, keepalive_expiry_s)
        self._pools: dict[tuple[str, str, int], _Pool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        pool = self._pool(request.url)
        connection = await pool.acquire(timeouts)
        try:
            connection.send(_serialized(request, await request.aread()))
            await connection.written(timeouts.get("write"))
            await connection.head(timeouts.get("read"))
        except BaseException:
            pool.release(connection, False)
            raise
        if request.method == "HEAD":  # httptools would wait for the body the headers announce
            connection.complete = True
            connection.abort()
        return httpx.Response(connection.status, headers=connection.headers,
                              stream=_Body(pool, connection, timeouts.get("read")),
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": connection.reason})

    def _pool(self, url: httpx.URL) -> _Pool:
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        pool = self._pools.get(origin)
        if pool is None:
            if url.scheme == "https" and self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context()
                self._ssl_context.set_alpn_protocols(["http/1.1"])
            pool = self._pools[origin] = _Pool(origin, self._ssl_context if url.scheme == "https" else None,
                                                *self._limits)
        return pool

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


def _serialized(request: httpx.Request, body: bytes) -> bytes:
    """The request as it goes on the wire, head and body in one write (httpx has set Host). The body is
    whole, so it goes with its length, whatever framing a streamed request had."""
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    framed = False
    for name, value in request.headers.raw:
        if name.lower() in _FRAMING:
            framed = True
        else:
            lines += (name, b": ", value, b"\r\n")
    if body or framed:
        lines.append(b"content-length: %d\r\n" % len(body))
    lines += (b"\r\n", body)
    return b"".join(lines)
