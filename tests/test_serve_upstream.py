"""The proxy's upstream transport (`policy_engine.serve.upstream`) against real sockets: asyncio servers
that answer with each HTTP/1.1 framing, misbehave, stall, or speak TLS with a certificate made by openssl."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from policy_engine.serve.upstream import UpstreamTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TIMEOUT = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    return head, await reader.readexactly(length)


def answering(reply: bytes, connections: list[asyncio.StreamWriter]) -> Handler:
    """A handler answering every request of a connection with `reply`, noting each connection."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(reply)
            await writer.drain()
    return handler


def serve(handler: Handler, *, tls: ssl.SSLContext | None = None) -> Callable[[Callable[[str], Awaitable[Any]]], Any]:
    """Run `test(url)` on an event loop with `handler` serving on a free port."""
    def run(test: Callable[[str], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
            port = server.sockets[0].getsockname()[1]
            try:
                return await test(f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{port}")
            finally:
                server.close()
        return asyncio.run(main())
    return run


def request(url: str, body: bytes = b'{"a":1}', method: str = "POST", **timeouts: float) -> httpx.Request:
    return httpx.Request(method, url + "/v1/messages?beta=true", headers={"x-api-key": "k"}, content=body,
                         extensions={"timeout": {**TIMEOUT, **timeouts}})


def test_one_connection_serves_requests_in_turn_with_each_written_whole() -> None:
    seen: list[tuple[bytes, bytes]] = []
    connections = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while not reader.at_eof():
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            seen.append((head, body))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: a=1\r\nset-cookie: b=2\r\n"
                         b"content-length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    async def test(url: str) -> list[tuple[int, bytes, list[str]]]:
        transport = UpstreamTransport()
        answers = []
        for n in range(3):
            response = await transport.handle_async_request(request(url, b'{"n":%d}' % n))
            answers.append((response.status_code, await response.aread(), response.headers.get_list("set-cookie")))
        await transport.aclose()
        return answers

    answers = serve(handler)(test)
    assert answers == [(200, b'{"n":%d}' % n, ["a=1", "b=2"]) for n in range(3)]
    assert len(connections) == 1  # kept alive
    head, body = seen[0]
    assert head.startswith(b"POST /v1/messages?beta=true HTTP/1.1\r\n") and b"x-api-key: k\r\n" in head
    assert b"content-length: 7\r\n" in head.lower() and body == b'{"n":0}'


def test_chunked_and_close_delimited_bodies_are_read_to_their_end() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)  # the chunked response keeps the connection for the next
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")  # no length: the body ends with the connection
        await writer.drain()
        writer.close()

    async def test(url: str) -> list[bytes]:
        transport = UpstreamTransport()
        chunked = await transport.handle_async_request(httpx.Request("POST", url + "/chunked", content=b"x",
                                                                     extensions={"timeout": TIMEOUT}))
        parts = [part async for part in chunked.aiter_raw()]
        closing = await transport.handle_async_request(request(url))
        return [b"".join(parts), await closing.aread()]

    assert serve(handler)(test) == [b"hello world", b"until the end"]


def test_an_interim_100_response_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def test(url: str) -> tuple[int, bytes]:
        response = await UpstreamTransport().handle_async_request(request(url))
        return response.status_code, await response.aread()

    assert serve(handler)(test) == (201, b"ok")


def test_failures_are_httpx_errors_the_life_cycle_judges() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/v1/cut" in head:  # the body promised, then the connection gone
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            await writer.drain()
            writer.close()
        elif b"/v1/garbage" in head:
            writer.write(b"this is not HTTP\r\n\r\n")
            await writer.drain()
        elif b"/v1/silent" in head:
            await asyncio.sleep(5)
        else:
            writer.close()  # no response at all

    async def test(url: str) -> list[str]:
        transport = UpstreamTransport()
        outcomes = []
        for path, timeouts in (("/v1/cut", {}), ("/v1/garbage", {}), ("/v1/silent", {"read": 0.2}), ("/v1/none", {})):
            try:
                response = await transport.handle_async_request(httpx.Request(
                    "POST", url + path, content=b"{}", extensions={"timeout": {**TIMEOUT, **timeouts}}))
                await response.aread()
                outcomes.append("ok")
            except httpx.TransportError as exc:
                outcomes.append(type(exc).__name__)
        try:
            await transport.handle_async_request(request("http://127.0.0.1:9"))  # nothing listens on the discard port
        except httpx.ConnectError:
            outcomes.append("ConnectError")
        return outcomes

    assert serve(handler)(test) == ["RemoteProtocolError", "RemoteProtocolError", "ReadTimeout",
                                    "RemoteProtocolError", "ConnectError"]


def test_bytes_after_a_response_end_it_and_the_connection() -> None:
    connections: list[asyncio.StreamWriter] = []
    # A wrong Content-Length (or a body after a 204): what follows must not become the next response.
    handler = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale",
                        connections)

    async def test(url: str) -> list[bytes]:
        transport = UpstreamTransport()
        bodies = []
        for _ in range(2):
            response = await transport.handle_async_request(request(url))
            bodies.append(await response.aread())
        return bodies

    assert serve(handler)(test) == [b"ok", b"ok"]
    assert len(connections) == 2  # the first connection was not reused


def test_an_early_answer_to_a_large_body_is_the_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body is refused unread
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!")
        await writer.drain()
        await asyncio.sleep(3)  # neither reading the rest nor closing: the answer must not wait for the body

    async def test(url: str) -> tuple[int, bytes]:
        response = await UpstreamTransport().handle_async_request(request(url, b"x" * (32 << 20), write=1.0))
        return response.status_code, await response.aread()

    assert serve(handler)(test) == (413, b"too big!")


def test_a_body_left_unread_closes_its_connection_and_the_next_request_gets_a_new_one() -> None:
    connections: list[asyncio.StreamWriter] = []
    handler = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", connections)

    async def test(url: str) -> bytes:
        transport = UpstreamTransport()
        first = await transport.handle_async_request(request(url))
        await first.aclose()  # never read: the connection cannot be reused
        second = await transport.handle_async_request(request(url))
        return await second.aread()

    assert serve(handler)(test) == b"hello"
    assert len(connections) == 2


def test_a_slow_reader_pauses_the_upstream_instead_of_buffering_the_whole_body() -> None:
    size = 64 << 20

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        block = b"x" * (1 << 20)
        for _ in range(size >> 20):
            writer.write(block)
            await writer.drain()  # waits while the proxy side has paused reading

    async def test(url: str) -> tuple[int, int]:
        response = await UpstreamTransport().handle_async_request(request(url))
        parts = response.aiter_raw()
        total = len(await parts.__anext__())
        await asyncio.sleep(0.5)  # a client that does not read: the transport must stop reading too
        stream = response.stream
        buffered = stream._connection.buffered  # type: ignore[attr-defined]
        async for part in parts:
            total += len(part)
        return buffered, total

    buffered, total = serve(handler)(test)
    assert buffered <= 4 << 20, buffered  # the high-water mark and a socket's worth, not 64 MiB
    assert total == size  # every byte, none lost while paused


def test_pool_timeout_when_every_connection_is_busy() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(2)

    async def test(url: str) -> str:
        transport = UpstreamTransport(max_connections=1)
        held = await transport.handle_async_request(request(url))  # its body is not read: the slot stays taken
        try:
            await transport.handle_async_request(request(url, pool=0.2))
        except httpx.PoolTimeout:
            return "PoolTimeout"
        finally:
            await held.aclose()
        return "no timeout"

    assert serve(handler)(test) == "PoolTimeout"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_upstream_is_verified(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
        await writer.drain()

    async def test(url: str) -> list[str]:
        outcomes = []
        try:  # the default trust store does not know this certificate
            await UpstreamTransport().handle_async_request(request(url))
            outcomes.append("accepted")
        except httpx.ConnectError:
            outcomes.append("refused")
        trusting = ssl.create_default_context(cafile=str(cert))
        try:  # a trusted certificate, but for another name than the one connected to
            await UpstreamTransport(ssl_context=trusting).handle_async_request(
                request(url.replace("localhost", "127.0.0.1")))
            outcomes.append("accepted")
        except httpx.ConnectError:
            outcomes.append("refused")
        response = await UpstreamTransport(ssl_context=trusting).handle_async_request(request(url))
        outcomes.append((await response.aread()).decode())
        return outcomes

    assert serve(handler, tls=server_context)(test) == ["refused", "refused", "secure"]


def test_an_idle_connection_the_upstream_closed_is_not_reused() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # keep-alive by HTTP/1.1's default...
        await writer.drain()
        writer.close()  # ...and closed at once, as an upstream's idle timeout would

    async def test(url: str) -> list[bytes]:
        transport = UpstreamTransport()
        first = await transport.handle_async_request(request(url))
        bodies = [await first.aread()]
        await asyncio.sleep(0.2)  # the close reaches the idle connection
        second = await transport.handle_async_request(request(url))
        bodies.append(await second.aread())
        return bodies

    assert serve(handler)(test) == [b"ok", b"ok"]
    assert len(connections) == 2


def test_a_closed_transport_takes_no_connection_back() -> None:
    ended = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # until the proxy side closes the connection
        ended.set()

    async def test(url: str) -> bytes:
        transport = UpstreamTransport()
        response = await transport.handle_async_request(request(url))
        await transport.aclose()  # shutting down while a response is still being read
        body = await response.aread()  # it finishes, and its connection is closed rather than kept idle
        await asyncio.wait_for(ended.wait(), 5)
        return body

    assert serve(handler)(test) == b"ok"


def test_open_connections_never_exceed_max_connections() -> None:
    open_now, most = [0], [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        try:
            while True:
                try:
                    await read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                await asyncio.sleep(0.02)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            open_now[0] -= 1

    async def test(url: str) -> list[bytes]:
        transport = UpstreamTransport(max_connections=3, max_keepalive=8)

        async def one() -> bytes:
            response = await transport.handle_async_request(request(url))
            return await response.aread()

        bodies = []
        for _ in range(3):  # bursts, with idle connections kept between them
            bodies += await asyncio.gather(*(one() for _ in range(10)))
        await transport.aclose()
        return bodies

    assert serve(handler)(test) == [b"ok"] * 30
    assert most[0] <= 3, most[0]  # idle connections count too: max_connections bounds every open socket
