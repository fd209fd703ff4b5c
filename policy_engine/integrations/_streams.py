"""The byte streams that let a `StreamTracker` read a Messages SSE body as it passes to the caller.

Kept apart from `_core` because the classes are made per HTTP library (httpx, or the SDK's
httpx2) inside a function, which the compiled `_core` module cannot hold.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ._core import StreamTracker

__all__ = ["decoded_headers", "tracked_stream"]


_HOP_HEADERS = ("content-encoding", "content-length")


def decoded_headers(headers: Any) -> Any:
    """Response headers for a body re-served already decoded: no encoding, no stale length."""
    headers = headers.copy()
    for name in _HOP_HEADERS:
        if name in headers:
            del headers[name]
    return headers


def tracked_stream(module: Any) -> type:
    """A byte stream (of `httpx` or `httpx2`, sync and async in one class, as httpx's own `ByteStream`) that
    feeds a `StreamTracker` on the way.

    The tracker settles when the body ends, when it is closed, and, should the caller just
    drop the stream, when the stream is garbage-collected.
    """

    class Tracked(module.SyncByteStream, module.AsyncByteStream):  # type: ignore[misc,name-defined]
        def __init__(self, response: Any, tracker: StreamTracker) -> None:
            self._response = response
            self._tracker = tracker
            weakref.finalize(self, tracker.dropped)

        def __iter__(self) -> Iterator[bytes]:
            try:
                for chunk in self._response.iter_bytes():
                    self._tracker.feed(chunk)
                    yield chunk
            finally:
                self._tracker.finish()

        async def __aiter__(self) -> AsyncIterator[bytes]:
            try:
                async for chunk in self._response.aiter_bytes():
                    self._tracker.feed(chunk)
                    yield chunk
            finally:
                await self._tracker.afinish()

        def close(self) -> None:
            try:
                self._response.close()
            finally:
                self._tracker.finish()

        async def aclose(self) -> None:
            try:
                await self._response.aclose()
            finally:
                await self._tracker.afinish()

    return Tracked
