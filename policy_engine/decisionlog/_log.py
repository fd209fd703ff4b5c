"""The decision log: a bounded queue on the request path, a writer thread off it.

    log = DecisionLog(JsonlFile("decisions.jsonl", max_bytes=100_000_000, compress=True))
    engine = policy_engine.load("policy.yaml", decision_log=log)

The request path only samples and enqueues (the decision, its settlement and the response's
usage, by reference); building the record, hashing ids, serializing and writing happen on the
writer thread. When the queue is full the record is dropped, never waited for: the drop is
counted in the `policy_engine.events` metric (`policy_engine.decision_log_dropped`) and in the
next record's `dropped`.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import random
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Final

from .. import telemetry
from .._fork import renew_in_child
from ._record import Privacy, build_record
from ._sinks import JsonlFile, Sink

__all__ = ["DecisionLog"]

_BATCH: Final = 256
_STOP: Final = object()
_open_logs: Final[weakref.WeakSet[DecisionLog]] = weakref.WeakSet()


class DecisionLog:
    """Where the engine sends one record per request that ended (settled, released or rejected).

    `sinks`: a `Sink` (`JsonlFile`, `LoggerSink`, `OtelLogSink`), several, or a path (a `JsonlFile`).
    `sample`: the fraction of requests recorded; those whose outcome is in `keep` (by default
    rejects and downgrades) are always recorded. `hash_context`: context keys whose values a
    record holds as a digest (HMAC-SHA256 with `secret`, else SHA-256); budget keys equal to one
    of them get the same digest. `labels`: the label names kept (None: all). `queue_size`: records
    waiting for the writer at most; beyond, records are dropped and counted.
    """

    def __init__(self, sinks: Sink | str | os.PathLike[str] | Sequence[Sink], *, sample: float = 1.0,
                 keep: Iterable[str] = ("rejected", "downgraded"), hash_context: Iterable[str] = ("user",),
                 secret: str | bytes | None = None, labels: Iterable[str] | None = None,
                 queue_size: int = 10_000) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample must be in [0, 1], got {sample!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size!r}")
        if isinstance(sinks, (str, os.PathLike)):
            sinks = [JsonlFile(sinks)]
        elif not isinstance(sinks, Sequence):
            sinks = [sinks]
        self.sinks: list[Sink] = list(sinks)
        self.sample = sample
        self.keep = frozenset(keep)
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        self.privacy = Privacy(tuple(hash_context), None if labels is None else frozenset(labels), secret or None)
        self.queue_size = queue_size
        self.dropped = 0
        """Records dropped since the log was made (the queue was full)."""
        self.written = 0
        self.write_errors = 0
        self._reported_drops = 0
        self._drop_lock = threading.Lock()
        self._scope_digest: Any = _plain_key
        self._renewal: object = renew_in_child(self._reset)
        self._reset()
        _open_logs.add(self)

    def _reset(self) -> None:
        # Also in a forked child: the parent's thread did not survive the fork, and its queued records are the parent's.
        self._queue: queue.Queue[Any] = queue.Queue(self.queue_size)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def bind(self, ledger: Any) -> None:
        """Name budget scopes in records as `ledger` stores them (hashed where it hashes them)."""
        ids = getattr(ledger, "_ids", None)
        if ids is not None and getattr(ids, "hashed", False):
            self._scope_digest = lambda key: "#" + ids.digest(key)
        else:
            self._scope_digest = _plain_key

    # -- the request path ------------------------------------------------------------------

    def emit(self, event: str, decision: Any, settlement: Any = None, usage: Any = None) -> None:
        """Queue the record of one request that ended. Never blocks, never raises."""
        rate = self.sample
        if rate < 1.0 and decision.outcome not in self.keep and random.random() >= rate:
            return
        if self._thread is None and not self._start():
            return  # closed
        try:
            self._queue.put_nowait((event, decision, settlement, usage, rate if decision.outcome not in self.keep else 1.0))
        except queue.Full:
            with self._drop_lock:
                self.dropped += 1
            telemetry.record_event("policy_engine.decision_log_dropped", {"policy_engine.queue_size": self.queue_size})

    def _start(self) -> bool:
        with self._start_lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(target=self._run, name="policy_engine-decision-log", daemon=True)
                thread.start()
                self._thread = thread
            return not self._closed

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        while True:
            items = [q.get()]
            while len(items) < _BATCH:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            records = [self._build(item) for item in items if item is not _STOP]
            if records:
                self._write(records)
            for _ in items:
                q.task_done()
            if stop:
                return

    def _build(self, item: tuple[Any, ...]) -> dict[str, Any]:
        event, decision, settlement, usage, rate = item
        dropped = self.dropped - self._reported_drops
        self._reported_drops += dropped
        return build_record(event, decision, settlement, usage, self.privacy, self._scope_digest, rate, dropped)

    def _write(self, records: list[dict[str, Any]]) -> None:
        lines = [json.dumps(r, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str) for r in records]
        for sink in self.sinks:
            try:
                sink.write(records, lines)
            except Exception as exc:  # a full disk or a closed collector must not stop the other sinks
                self.write_errors += 1
                telemetry.record_event("policy_engine.decision_log_write_failed", {
                    "policy_engine.sink": type(sink).__name__, "policy_engine.error": str(exc)[:200]})
        self.written += len(records)

    # -- life ------------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written (False: `timeout` seconds passed first)."""
        deadline = time.monotonic() + timeout
        q = self._queue
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                q.all_tasks_done.wait(left)
        for sink in self.sinks:
            sink.flush()
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer and close the sinks. Records emitted after are dropped."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
            thread.join(timeout)
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain_key(key: str) -> str:
    return key


@atexit.register
def _close_all() -> None:
    # At interpreter exit the writer (a daemon thread) would be killed with records still queued.
    for log in list(_open_logs):
        log.close(timeout=5.0)
