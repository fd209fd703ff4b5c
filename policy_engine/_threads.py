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
import logging
from typing import Any, Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger("policy_engine")


def in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`fn(*args)` on the running loop's default executor, in a copy of the caller's context (its span)."""
    return asyncio.get_running_loop().run_in_executor(None, functools.partial(contextvars.copy_context().run, fn, *args))


async def run_in_thread(fn: Callable[..., T], *args: Any, undo: Callable[[T], Any] | None = None) -> T:
    """Await `fn(*args)` on a worker thread: a cancellation stops the waiting, never the work. `undo`, if
    given, then gets the result nobody awaits (a reservation to release), on a worker thread too."""
    work = in_thread(fn, *args)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if undo is not None:
            work.add_done_callback(functools.partial(_undo, undo))
        raise


def in_background(fn: Callable[..., Any], *args: Any) -> None:
    """`fn(*args)` on a worker thread, awaited by nobody: a failure is logged, not left for asyncio to report."""
    in_thread(fn, *args).add_done_callback(_log_failure)


def _undo(undo: Callable[[Any], Any], done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is None:  # (a failure is the awaiting shield's to retrieve)
        in_background(undo, done.result())


def _log_failure(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.error("background engine call failed", exc_info=exc)
