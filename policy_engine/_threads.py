"""Blocking work an event loop hands to a worker thread, which neither a cancellation nor the loop's shutdown drops.

`asyncio.to_thread` wraps the job in a task's await: cancelling that task (which `asyncio.run` and
uvicorn do to every task left at shutdown) cancels the job too when it is still queued behind busy
workers, and it never runs. A settlement must run: `in_thread` hands the job to the loop's default
executor as a plain future, which the shutdown does not cancel and whose executor runs every queued
job before the loop closes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`fn(*args)` on the running loop's default executor, in a copy of the caller's context (its span)."""
    return asyncio.get_running_loop().run_in_executor(None, functools.partial(contextvars.copy_context().run, fn, *args))


async def run_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Await `fn(*args)` on a worker thread: a cancellation stops the waiting, never the work."""
    return await asyncio.shield(in_thread(fn, *args))
